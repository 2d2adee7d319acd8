//! Work queues in Redis: the state machine of [`crate::broker::domain::queue`] as Lua
//! scripts, one script call per operation, each touching the keys of one queue only.
//!
//! # Data model
//!
//! Every key of queue `q` starts with `sluice:{q:q}` (its hash tag, [`QueueKeys`]), so the
//! queue lives in one cluster slot. Scripts get that prefix as `KEYS[1]` and build the
//! other keys from it (they carry the same tag, so they are in the same slot; Redis
//! Cluster accepts keys a script builds as long as they hash to its slot):
//!
//! * `:meta` hash: `seq` (last job seq), the policy fields the scripts read (`vis`,
//!   `max_attempts`, `b_sched` or `b_init`/`b_max`/`b_jitter`, `dlq`, `history_limit`,
//!   `dedup_ms`, `max_depth`, `max_in_flight`, `rate_ps`, `rate_burst`), `policy` (the
//!   whole policy in its write-ahead-log record form, read back by [`QueueStore::info`]),
//!   `paused`, the rate limit's bucket (`tok` thousandths of a token at `tok_at`), the
//!   time the limits held visible jobs back (as `domain::queue::throttle`: `rl_ms` counted
//!   by the rate limit up to `rl_until`, `if_ms` by `max_in_flight` plus the open interval
//!   since `if_since`), `by_consumer` (1 while only Lease or Consume has named the queue:
//!   set by the define script for them, cleared by what puts a job in or sets a policy or
//!   pause), `due` (a time at or before the earliest lease deadline, timer and
//!   idempotency-window end, so the scripts skip those scans until then; see `due_by` in
//!   common.lua), `esec`/`asec` (the second the enqueue and ack rates last counted in,
//!   see `:rates`), and counters: `blocked`, `retrying`, `enqueued`, `completed`,
//!   `failed`, `dead`, `cancelled`. A queue exists while its meta hash does.
//! * `:rates` hash: jobs enqueued and acked per second over the last 10 seconds, as
//!   `domain::rate::RateMeter` counts them: slot `second % 10` holds a count (`e<slot>`,
//!   `a<slot>`) and the second it counts (`es<slot>`, `as<slot>`); a new second
//!   overwrites its slot, so the hash stays at 40 fields. Written by the enqueue and ack
//!   scripts, summed by the counts script.
//! * `:ready` zset: visible jobs, scored `(9 - priority) * 2^44 + seq`, so `ZPOPMIN`
//!   leases by priority, then FIFO.
//! * `:timers` zset: scheduled and retrying jobs by run time.
//! * `:leased` zset: leased jobs by lease deadline.
//! * `:live` zset: every live (unfinished) job by seq, for listing and max depth.
//! * `:job:<seq>` hash per job: `id`, `kind`, `payload`, `headers` (the log's
//!   `map<string, string>` encoding), `prio`, `attempts`, `max_att`, `ikey`, `okey`,
//!   `state`, `enq_at`, `run_at`, `upd_at`, `fin_at`, `deadline` (the lease's, read only
//!   while leased: an ack leaves it), `nonce`
//!   (hex, of the latest delivery), `consumer`, `error`, `result`, `dlq`, `origin`,
//!   `blocked` (waiting behind its ordering key), `dltoken` (see dead letters).
//! * `:ids` hash: job id to seq, for every job that has a hash.
//! * `:idem` hash (idempotency key to the first job's id) and `:idemexp` zset (key by the
//!   end of its window): keys are pruned by the scripts, and a queue's delete finds them
//!   all (string keys with their own expiry could not be listed without a scan).
//! * `:history` list: finished jobs in finish order as `<seq>:<id>` (`<seq>` alone in
//!   entries written before ids were added), trimmed to the policy's history limit (a
//!   trimmed job's hash and id go with it; the id in the entry spares reading the job).
//! * `:ord:<key>` list per ordering key: its live jobs in enqueue order; only the front
//!   one is in `ready`/`timers`/`leased`, the others are `blocked`, so one key is never
//!   leased twice at once.
//! * `:consumers` hash: consumer name to a JSON object (address, leases held, last seen,
//!   done, failed).
//! * `:outbox` list and `:dl:<seq>` hashes: dead jobs waiting to move to their dead-letter
//!   queue (a copy of the job's hash, kept even if history drops the job).
//! * `:waiting` zset: tokens of waiters (long polls, Consume streams with credit) about to
//!   wait, by when their note runs out (see [`WaitingNote`]); expires with its last note.
//!
//! Scripts that make jobs visible end with `SPUBLISH <prefix>:wake <n>` (a shard channel
//! in the queue's slot) while some waiter's note lasts, so nodes can wake long polls; a
//! queue whose workers never wait publishes nothing.
//!
//! Time is Redis's (`TIME` in every script). The node makes the random parts: job ids
//! (UUIDv7), lease nonces, and the numbers the backoff jitter draws from.
//!
//! # Dead letters
//!
//! A job that dies in a queue with a dead-letter queue is copied to the outbox in the same
//! script. [`QueueStore::move_dead_letters`] then moves it in three steps: read the
//! outbox, insert each letter into its dead-letter queue (another slot) marked with the
//! token `<origin>/<seq>` (one death of one job), and drop the moved letters from the
//! outbox. A retry after a crash between the steps finds the token on the copy and does
//! not insert it twice.
//!
//! # Differences from the in-process queue
//!
//! * An ack batch is all or none within its queue (as the in-process broker is), and
//!   [`QueueStore::ack`] reports every lease's result; when any is an error nothing was
//!   applied.
//! * The oldest pending age is that of the oldest front of each priority (a job behind a
//!   newer-visible one of its priority is not seen).
//! * Times saturate at 2^53 - 1 ms (Lua numbers are doubles), not at `u64::MAX`.
//! * Job ids are UUIDv7s made by the node, not ids that encode the seq.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use prost::Message as _;
use redis::{FromRedisValue, Value};
use uuid::Uuid;

use crate::broker::domain::error::BrokerError;
use crate::broker::domain::limits::Headers;
use crate::broker::domain::queue::{
    Backoff, ConsumerState, Delivery, Enqueued, HEADER_ATTEMPTS, HEADER_DEAD_LETTERED_AT,
    HEADER_LAST_ERROR, HEADER_ORIGINAL_QUEUE, Job, JobState, LeaseId, NewJob, QueueCounts,
    QueuePolicy,
};
use crate::broker::domain::rate::WINDOW_SECS;
use crate::broker::domain::time::Millis;
use crate::broker::store::{decode_policy, encode_policy};

use super::conn::{RedisConn, unavailable};
use super::keys::{QueueKeys, catalog};
use library::Call;

/// What every queue function starts with: key names and the state machine's shared
/// steps (the top of the library, see [`library`]).
const COMMON: &str = include_str!("queue/common.lua");

/// Dead letters read from an outbox at a time.
const DEAD_LETTER_BATCH: usize = 100;

/// A job's headers as stored: the write-ahead log's `map<string, string>`, alone.
#[derive(Clone, PartialEq, prost::Message)]
struct HeadersRecord {
    /// The headers.
    #[prost(map = "string, string", tag = "1")]
    headers: HashMap<String, String>,
}

fn encode_headers(headers: &Headers) -> Vec<u8> {
    if headers.is_empty() {
        return Vec::new();
    }
    HeadersRecord {
        headers: headers.clone(),
    }
    .encode_to_vec()
}

/// A consumer as the scripts keep it (JSON; numbers may come back as floats).
#[derive(serde::Deserialize)]
struct ConsumerRecord {
    a: String,
    h: f64,
    s: f64,
    d: f64,
    f: f64,
}

/// The error for a reply that is not what the script returns.
fn malformed(what: &str, detail: impl std::fmt::Display) -> BrokerError {
    BrokerError::Unavailable(format!("redis: unexpected reply for {what}: {detail}"))
}

/// Maps a script's refusal to the error the in-process engine gives; anything else is
/// Redis failing. `lease` prefixes stale-lease refusals.
fn script_error(doing: &str, lease: Option<&LeaseId>, e: redis::RedisError) -> BrokerError {
    let detail = e.detail().unwrap_or_default().to_owned();
    match e.code() {
        Some("SLUICE_NOTFOUND") => BrokerError::NotFound(detail),
        Some("SLUICE_EXISTS") => BrokerError::AlreadyExists(detail),
        Some("SLUICE_PRECOND") => BrokerError::FailedPrecondition(detail),
        Some("SLUICE_FULL") => BrokerError::ResourceExhausted(detail),
        Some("SLUICE_SCHEMA") => BrokerError::SchemaStale {
            revision: detail.trim().parse().unwrap_or(0),
        },
        Some("SLUICE_STALE") => match lease {
            Some(lease) => stale(lease, &detail),
            None => BrokerError::FailedPrecondition(detail),
        },
        // Redis failing, or refusing a write for its maxmemory (`unavailable` tells them
        // apart).
        _ => unavailable(doing, e),
    }
}

/// The in-process engine's stale-lease refusal.
fn stale(lease: &LeaseId, why: &str) -> BrokerError {
    BrokerError::FailedPrecondition(format!("lease {lease} is stale: {why}"))
}

/// Reads a script's array reply element by element.
struct Row {
    what: &'static str,
    items: std::vec::IntoIter<Value>,
}

impl Row {
    fn new(what: &'static str, v: Value) -> Result<Self, BrokerError> {
        match v {
            Value::Array(items) => Ok(Self {
                what,
                items: items.into_iter(),
            }),
            other => Err(malformed(what, format!("{other:?} is not an array"))),
        }
    }

    fn next<T: FromRedisValue>(&mut self) -> Result<T, BrokerError> {
        let v = self
            .items
            .next()
            .ok_or_else(|| malformed(self.what, "too few elements"))?;
        redis::from_redis_value(v).map_err(|e| malformed(self.what, e))
    }

    fn rest(self) -> std::vec::IntoIter<Value> {
        self.items
    }
}

/// A lease's arguments after the queue name: `max`, the visibility timeout ('' for the
/// policy's), the consumer, its address, a jitter seed and `max` fresh nonces.
fn lease_args(
    inv: &mut Call,
    max: usize,
    visibility_ms: Option<u64>,
    consumer: &str,
    address: &str,
) {
    let max = max.max(1);
    inv.arg(max)
        .arg(visibility_ms.map_or_else(String::new, |v| v.to_string()))
        .arg(consumer)
        .arg(address)
        .arg(jitter_seed());
    for _ in 0..max {
        inv.arg(format!("{:x}", fastrand::u64(1..)));
    }
}

/// The deliveries a lease script returned, leases of queue `name`.
fn deliveries(name: &str, rows: Vec<Value>) -> Result<Vec<Delivery>, BrokerError> {
    let queue: Arc<str> = Arc::from(name);
    let mut out = Vec::with_capacity(rows.len());
    for row in rows {
        let mut r = Row::new("lease", row)?;
        let id: String = r.next()?;
        let seq: u64 = r.next()?;
        let kind: String = r.next()?;
        let payload: Vec<u8> = r.next()?;
        let headers: Vec<u8> = r.next()?;
        let priority: u8 = r.next()?;
        let attempt: u32 = r.next()?;
        let max_attempts: u32 = r.next()?;
        let enqueued_at: Millis = r.next()?;
        let deadline: Millis = r.next()?;
        let ordering_key: String = r.next()?;
        let nonce: String = r.next()?;
        let headers = if headers.is_empty() {
            Headers::new()
        } else {
            HeadersRecord::decode(headers.as_slice())
                .map_err(|e| malformed("lease headers", e))?
                .headers
        };
        out.push(Delivery {
            job_id: Uuid::parse_str(&id).map_err(|e| malformed("lease", e))?,
            lease_id: LeaseId {
                queue: queue.clone(),
                seq,
                nonce: u64::from_str_radix(&nonce, 16).map_err(|e| malformed("lease nonce", e))?,
            },
            kind: Arc::from(kind),
            payload: Bytes::from(payload),
            headers,
            priority,
            attempt,
            max_attempts,
            enqueued_at,
            deadline,
            ordering_key: ordering_key.strip_prefix('=').map(Arc::from),
        });
    }
    Ok(out)
}

/// An ack's arguments after the queue name: the count, then seq, nonce and result
/// ('' for none, else '=' then the bytes) per ack.
fn ack_args(inv: &mut Call, queue: &str, acks: &[(LeaseId, Option<Bytes>)]) {
    inv.arg(acks.len());
    for (lease, result) in acks {
        debug_assert_eq!(&*lease.queue, queue, "acks are grouped by queue");
        inv.arg(lease.seq).arg(format!("{:x}", lease.nonce));
        match result {
            Some(r) => inv.arg([b"=".as_slice(), r.as_ref()].concat()),
            None => inv.arg(""),
        };
    }
}

/// One result per ack from the ack script's reply.
fn ack_results(
    acks: &[(LeaseId, Option<Bytes>)],
    reply: Value,
) -> Result<Vec<Result<(), BrokerError>>, BrokerError> {
    let mut row = Row::new("ack", reply)?;
    let _applied: i64 = row.next()?;
    let mut out = Vec::with_capacity(acks.len());
    for (lease, _) in acks {
        let why: String = row.next()?;
        out.push(match why.as_str() {
            "live" | "acked" => Ok(()),
            why => Err(stale(lease, why)),
        });
    }
    Ok(out)
}

/// What a sweep of one queue did and found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Swept {
    /// Jobs whose lease expired or whose timer came due.
    pub(crate) changed: u64,
    /// Dead letters waiting in the queue's outbox to move to their dead-letter queues.
    pub(crate) dead_letters: u64,
}

/// A job's hash fields, read into a [`Job`].
struct Fields<'a> {
    queue: &'a str,
    seq: u64,
    map: HashMap<String, Vec<u8>>,
}

impl Fields<'_> {
    fn bytes(&mut self, name: &str) -> Option<Vec<u8>> {
        self.map.remove(name)
    }

    fn text(&mut self, name: &str) -> Result<Option<String>, BrokerError> {
        self.bytes(name)
            .map(|b| String::from_utf8(b).map_err(|_| self.bad(name, "is not UTF-8 text".into())))
            .transpose()
    }

    fn num(&mut self, name: &str) -> Result<Option<u64>, BrokerError> {
        self.text(name)?
            .map(|t| {
                t.parse()
                    .map_err(|_| self.bad(name, format!("{t:?} is no number")))
            })
            .transpose()
    }

    fn bad(&self, name: &str, why: String) -> BrokerError {
        BrokerError::Unavailable(format!(
            "redis: job {} of queue {:?}: field {name} {why}",
            self.seq, self.queue
        ))
    }

    fn into_job(mut self) -> Result<Job, BrokerError> {
        let id_text = self.text("id")?.unwrap_or_default();
        let id = Uuid::parse_str(&id_text)
            .map_err(|_| self.bad("id", format!("{id_text:?} is no job id")))?;
        let state_text = self.text("state")?.unwrap_or_default();
        let state = JobState::ALL
            .into_iter()
            .find(|s| s.as_str() == state_text)
            .ok_or_else(|| self.bad("state", format!("{state_text:?} is no state")))?;
        let headers = match self.bytes("headers") {
            Some(b) if !b.is_empty() => {
                HeadersRecord::decode(b.as_slice())
                    .map_err(|e| self.bad("headers", e.to_string()))?
                    .headers
            }
            _ => Headers::new(),
        };
        let kind = self.text("kind")?.unwrap_or_default();
        let payload = Bytes::from(self.bytes("payload").unwrap_or_default());
        let mut job = Job::restored(id, kind, payload, headers);
        job.seq = self.seq;
        job.state = state;
        job.priority = self.num("prio")?.unwrap_or(0).min(9) as u8;
        job.attempts = self.num("attempts")?.unwrap_or(0) as u32;
        job.max_attempts = self.num("max_att")?.unwrap_or(1) as u32;
        job.idempotency_key = self.text("ikey")?;
        job.ordering_key = self.text("okey")?.map(Arc::from);
        job.enqueued_at = self.num("enq_at")?.unwrap_or(0);
        job.run_at = self.num("run_at")?.unwrap_or(0);
        job.updated_at = self.num("upd_at")?.unwrap_or(0);
        job.finished_at = self.num("fin_at")?;
        // An acked job keeps its last lease's deadline (ack.lua leaves it): only a live
        // lease has one.
        job.lease_deadline = if state == JobState::Leased {
            self.num("deadline")?
        } else {
            None
        };
        job.lease_nonce = match self.text("nonce")? {
            Some(hex) => u64::from_str_radix(&hex, 16)
                .map_err(|_| self.bad("nonce", format!("{hex:?} is not hexadecimal")))?,
            None => 0,
        };
        // As in the in-process queue: the consumer of the live lease, or of the last
        // delivery of a finished job.
        let consumer = self.text("consumer")?;
        if state == JobState::Leased || state.is_finished() {
            job.consumer = consumer.map(Arc::from);
        }
        job.last_error = self.text("error")?;
        job.result = self.bytes("result").map(Bytes::from);
        job.dead_letter_queue = self.text("dlq")?;
        job.origin = self.text("origin")?;
        Ok(job)
    }
}

/// Reads `{seq, fields}` into a job.
fn job_of(queue: &str, v: Value) -> Result<Job, BrokerError> {
    let mut row = Row::new("a job", v)?;
    let seq: u64 = row.next()?;
    let map: HashMap<String, Vec<u8>> = row.next()?;
    Fields { queue, seq, map }.into_job()
}

/// The meta fields the scripts read, as field/value pairs after the encoded policy.
fn policy_args(policy: &QueuePolicy) -> Vec<(&'static str, String)> {
    let (sched, init, max, jitter) = match &policy.backoff {
        Backoff::Schedule(delays) => {
            let list: Vec<String> = delays.iter().map(u64::to_string).collect();
            // An empty schedule retries at once, like `Backoff::delay_ms`.
            let list = if list.is_empty() {
                "0".to_owned()
            } else {
                list.join(",")
            };
            (list, 0, 0, false)
        }
        Backoff::Exponential {
            initial_ms,
            max_ms,
            jitter,
        } => (String::new(), *initial_ms, *max_ms, *jitter),
    };
    vec![
        ("vis", policy.visibility_timeout_ms.to_string()),
        ("max_attempts", policy.max_attempts.to_string()),
        ("b_sched", sched),
        ("b_init", init.to_string()),
        ("b_max", max.to_string()),
        ("b_jitter", if jitter { "1" } else { "0" }.to_owned()),
        ("dlq", policy.dead_letter_queue.clone()),
        ("history_limit", policy.history_limit.to_string()),
        ("dedup_ms", policy.dedup_window_ms.to_string()),
        ("max_depth", policy.max_depth.to_string()),
        (
            "max_in_flight",
            policy.max_in_flight.unwrap_or(0).to_string(),
        ),
        (
            "rate_ps",
            policy.rate_limit.map_or(0, |r| r.per_second).to_string(),
        ),
        (
            "rate_burst",
            policy.rate_limit.map_or(0, |r| r.burst).to_string(),
        ),
    ]
}

/// `Some(x)` as `=x`, `None` as the empty string, so an empty key stays a key.
fn optional(value: Option<&str>) -> String {
    value.map_or_else(String::new, |v| format!("={v}"))
}

/// A random number for the scripts' backoff jitter (small enough for Lua's doubles).
fn jitter_seed() -> u64 {
    fastrand::u64(0..1 << 40)
}

/// How long a waiter's note on its queue lasts (queue/waiting.lua). A waiter renews it
/// once every poll interval while it waits, so a note outlives a renewal or two that
/// came late, and one left by a waiter that stopped waiting (or a node that died) costs
/// at most this long of wake-ups nobody needed.
const WAITING_NOTE_MS: u64 = 4 * super::wake::POLL_INTERVAL.as_millis() as u64;

/// One waiter's note on its queue: without one, the scripts that make jobs visible
/// publish no wake-up (a busy queue's workers never wait, and pay nothing for it).
#[derive(Debug)]
pub(crate) struct WaitingNote {
    token: String,
    noted: Option<tokio::time::Instant>,
}

impl WaitingNote {
    /// A note for a new waiter (made on its first wait).
    pub(crate) fn new() -> Self {
        Self {
            token: format!("{:x}", fastrand::u64(..)),
            noted: None,
        }
    }

    /// Whether the waiter must note itself (again) before it waits; after noting, it
    /// looks once more, so a job made visible before the note is not missed.
    pub(crate) fn due(&self) -> bool {
        self.noted
            .is_none_or(|at| at.elapsed() >= super::wake::POLL_INTERVAL)
    }

    /// Notes (or renews) the waiter on `queue`.
    pub(crate) async fn note(
        &mut self,
        queues: &QueueStore,
        queue: &str,
    ) -> Result<(), BrokerError> {
        queues
            .note_waiting(queue, &self.token, WAITING_NOTE_MS)
            .await?;
        self.noted = Some(tokio::time::Instant::now());
        Ok(())
    }
}

/// The work queues of the Redis engine. Cheap to clone.
#[derive(Clone)]
pub(crate) struct QueueStore {
    conn: RedisConn,
    /// Enqueues waiting to share a script call with the one in flight on their queue.
    groups: Arc<coalesce::Groups>,
    /// A test's clock (ms): the scripts' time instead of Redis's `TIME` (see
    /// [`QueueStore::with_clock`]).
    #[cfg(test)]
    clock: Option<Arc<std::sync::atomic::AtomicU64>>,
}

impl QueueStore {
    /// Queues kept through `conn`.
    pub(crate) fn new(conn: RedisConn) -> Self {
        Self {
            conn,
            groups: Arc::default(),
            #[cfg(test)]
            clock: None,
        }
    }

    /// Queues kept through `conn` whose scripts take the time from `clock` (ms), so a test
    /// drives time explicitly (see `queue/test_clock.rs`).
    #[cfg(test)]
    pub(crate) fn with_clock(conn: RedisConn, clock: Arc<std::sync::atomic::AtomicU64>) -> Self {
        Self {
            conn,
            groups: Arc::default(),
            clock: Some(clock),
        }
    }

    /// Runs a call of a queue function.
    async fn run<T: FromRedisValue>(
        &self,
        doing: &str,
        lease: Option<&LeaseId>,
        call: &Call,
    ) -> Result<T, BrokerError> {
        let mut c = self.conn.clone();
        #[cfg(test)]
        if let Some(clock) = &self.clock {
            let mut c = test_clock::ClockConn {
                inner: c,
                now: clock.load(std::sync::atomic::Ordering::SeqCst),
            };
            return call
                .invoke(&mut c)
                .await
                .map_err(|e| script_error(doing, lease, e));
        }
        call.invoke(&mut c)
            .await
            .map_err(|e| script_error(doing, lease, e))
    }

    /// Runs define.lua in `mode` with `policy`; a queue it creates is marked created by a
    /// consumer when `by_consumer`.
    async fn define(
        &self,
        name: &str,
        mode: &str,
        policy: &QueuePolicy,
        by_consumer: bool,
    ) -> Result<bool, BrokerError> {
        let keys = QueueKeys::new(name);
        let mut inv = Call::new("define", keys.base());
        inv.arg(name).arg(mode).arg(encode_policy(policy));
        for (field, value) in policy_args(policy) {
            inv.arg(field).arg(value);
        }
        if by_consumer {
            inv.arg("by_consumer").arg(1);
        }
        let created: i64 = self
            .run(&format!("defining queue {name:?}"), None, &inv)
            .await?;
        Ok(created == 1)
    }

    async fn catalog_add(&self, name: &str) -> Result<(), BrokerError> {
        let mut c = self.conn.clone();
        redis::cmd("SADD")
            .arg(catalog("queues"))
            .arg(name)
            .query_async::<()>(&mut c)
            .await
            .map_err(|e| unavailable("adding a queue to the catalog", e))
    }

    /// Creates the queue; AlreadyExists if it exists. The queue is created first, then
    /// named in the catalog (a second command: the catalog has its own slot), so a crash
    /// between the two leaves a queue that works but is missing from [`QueueStore::names`]
    /// until it is deleted and created again.
    pub(crate) async fn create(&self, name: &str, policy: &QueuePolicy) -> Result<(), BrokerError> {
        self.define(name, "create", policy, false).await?;
        self.catalog_add(name).await
    }

    /// Creates the queue with `policy` if it is missing, marked created by a consumer when
    /// `by_consumer`; returns whether it did. Catalog order as in [`QueueStore::create`].
    pub(crate) async fn ensure(
        &self,
        name: &str,
        policy: &QueuePolicy,
        by_consumer: bool,
    ) -> Result<bool, BrokerError> {
        let created = self.define(name, "ensure", policy, by_consumer).await?;
        if created {
            self.catalog_add(name).await?;
        }
        Ok(created)
    }

    /// Replaces the policy (live jobs keep their attempts; history is trimmed to the new
    /// limit; a changed rate limit starts with a full bucket). NotFound if missing.
    pub(crate) async fn set_policy(
        &self,
        name: &str,
        policy: &QueuePolicy,
    ) -> Result<(), BrokerError> {
        self.define(name, "set", policy, false).await.map(|_| ())
    }

    /// The queue's policy and whether it is paused; `None` if it does not exist.
    pub(crate) async fn info(
        &self,
        name: &str,
    ) -> Result<Option<(QueuePolicy, bool)>, BrokerError> {
        let mut c = self.conn.clone();
        let (policy, paused): (Option<Vec<u8>>, Option<String>) = redis::cmd("HMGET")
            .arg(QueueKeys::new(name).key("meta"))
            .arg("policy")
            .arg("paused")
            .query_async(&mut c)
            .await
            .map_err(|e| unavailable(&format!("reading queue {name:?}"), e))?;
        let Some(bytes) = policy else {
            return Ok(None);
        };
        let policy = decode_policy(&bytes)
            .ok_or_else(|| malformed("a queue's policy", format!("queue {name:?}")))?;
        Ok(Some((policy, paused.as_deref() == Some("1"))))
    }

    /// Pauses or resumes leasing. NotFound if missing.
    pub(crate) async fn set_paused(&self, name: &str, paused: bool) -> Result<(), BrokerError> {
        let keys = QueueKeys::new(name);
        let mut inv = Call::new("set_paused", keys.base());
        inv.arg(name).arg(if paused { "1" } else { "0" });
        self.run::<i64>(&format!("pausing queue {name:?}"), None, &inv)
            .await
            .map(|_| ())
    }

    /// Deletes the queue and all its keys, then its catalog entry (a crash between the two
    /// leaves a name in the catalog whose queue is gone: [`QueueStore::info`] says so).
    /// NotFound if missing.
    pub(crate) async fn delete(&self, name: &str) -> Result<(), BrokerError> {
        let keys = QueueKeys::new(name);
        let mut inv = Call::new("delete", keys.base());
        inv.arg(name);
        self.run::<i64>(&format!("deleting queue {name:?}"), None, &inv)
            .await?;
        let mut c = self.conn.clone();
        redis::cmd("SREM")
            .arg(catalog("queues"))
            .arg(name)
            .query_async::<()>(&mut c)
            .await
            .map_err(|e| unavailable("removing a queue from the catalog", e))
    }

    /// Cancels every job that is not leased; returns how many.
    pub(crate) async fn purge(&self, name: &str) -> Result<u64, BrokerError> {
        let keys = QueueKeys::new(name);
        let mut inv = Call::new("purge", keys.base());
        inv.arg(name).arg(jitter_seed());
        self.run(&format!("purging queue {name:?}"), None, &inv)
            .await
    }

    /// The names of the queues, sorted.
    pub(crate) async fn names(&self) -> Result<Vec<String>, BrokerError> {
        let mut c = self.conn.clone();
        let mut names: Vec<String> = redis::cmd("SMEMBERS")
            .arg(catalog("queues"))
            .query_async(&mut c)
            .await
            .map_err(|e| unavailable("listing queues", e))?;
        names.sort_unstable();
        Ok(names)
    }

    /// Stores jobs in an existing queue, all or none (refused past max depth, counting
    /// only jobs that are not duplicates). One outcome per job, in order.
    #[cfg(test)]
    pub(crate) async fn enqueue(
        &self,
        name: &str,
        jobs: Vec<NewJob>,
    ) -> Result<Vec<Enqueued>, BrokerError> {
        self.enqueue_checked(name, &jobs, 0).await
    }

    /// [`QueueStore::enqueue`] of a batch checked against schema revision
    /// `schema_revision` (0: none): refused with [`BrokerError::SchemaStale`], storing
    /// nothing, when the queue's current revision is another. Batches that arrive while
    /// another enqueue to the queue is in flight share one script call (`coalesce`).
    pub(crate) async fn enqueue_checked(
        &self,
        name: &str,
        jobs: &[NewJob],
        schema_revision: u32,
    ) -> Result<Vec<Enqueued>, BrokerError> {
        let jobs = jobs.iter().map(coalesce::ScriptJob::new).collect();
        coalesce::enqueue(self, name, jobs, schema_revision).await
    }

    /// One enqueue.lua call storing `requests` (each all or none; the whole call all or
    /// none) checked against `schema_revision`: the outcomes of every job, in order.
    async fn enqueue_call(
        &self,
        name: &str,
        requests: &[&[coalesce::ScriptJob]],
        schema_revision: u32,
    ) -> Result<Vec<Enqueued>, BrokerError> {
        let keys = QueueKeys::new(name);
        let mut inv = Call::new("enqueue", keys.base());
        let total: usize = requests.iter().map(|r| r.len()).sum();
        inv.arg(name).arg(total);
        for job in requests.iter().copied().flatten() {
            job.args(&mut inv);
        }
        inv.arg(schema_revision);
        if requests.len() > 1 {
            for r in requests {
                inv.arg(r.len());
            }
        }
        let outcomes: Vec<(String, i64)> = self
            .run(&format!("enqueueing to queue {name:?}"), None, &inv)
            .await?;
        if outcomes.len() != total {
            return Err(malformed(
                "enqueue",
                format!("{} outcomes for {total} jobs", outcomes.len()),
            ));
        }
        outcomes
            .into_iter()
            .map(|(id, duplicate)| {
                Ok(Enqueued {
                    id: Uuid::parse_str(&id).map_err(|e| malformed("enqueue", e))?,
                    duplicate: duplicate == 1,
                })
            })
            .collect()
    }

    /// Leases up to `max` visible jobs for `visibility_ms` (the policy's if `None`)
    /// without waiting. Due timers and expired leases are handled first; a paused queue
    /// and the in-flight and rate limits hold jobs back. Records the consumer.
    pub(crate) async fn lease(
        &self,
        name: &str,
        max: usize,
        visibility_ms: Option<u64>,
        consumer: &str,
        address: &str,
    ) -> Result<Vec<Delivery>, BrokerError> {
        let keys = QueueKeys::new(name);
        let mut inv = Call::new("lease", keys.base());
        inv.arg(name);
        lease_args(&mut inv, max, visibility_ms, consumer, address);
        let rows: Vec<Value> = self
            .run(&format!("leasing from queue {name:?}"), None, &inv)
            .await?;
        deliveries(name, rows)
    }

    /// Acks leases of `queue`, all or none: one result per ack, and when any is an error
    /// (a stale lease) nothing was applied. A repeat ack of the same lease is OK.
    pub(crate) async fn ack(
        &self,
        queue: &str,
        acks: Vec<(LeaseId, Option<Bytes>)>,
    ) -> Result<Vec<Result<(), BrokerError>>, BrokerError> {
        let keys = QueueKeys::new(queue);
        let mut inv = Call::new("ack", keys.base());
        inv.arg(queue);
        ack_args(&mut inv, queue, &acks);
        let reply: Value = self
            .run(&format!("acking in queue {queue:?}"), None, &inv)
            .await?;
        ack_results(&acks, reply)
    }

    /// [`Self::ack`] then [`Self::lease`] in one script, one round trip: what a Consume
    /// stream does when a worker settles jobs and asks for more (as BullMQ's
    /// `moveToFinished` fetches the next job). The lease runs whether or not the acks
    /// were applied.
    pub(crate) async fn ack_lease(
        &self,
        queue: &str,
        acks: &[(LeaseId, Option<Bytes>)],
        lease: (usize, Option<u64>, &str, &str),
    ) -> Result<(Vec<Result<(), BrokerError>>, Vec<Delivery>), BrokerError> {
        let (max, visibility_ms, consumer, address) = lease;
        let keys = QueueKeys::new(queue);
        let mut inv = Call::new("ack_lease", keys.base());
        inv.arg(queue);
        ack_args(&mut inv, queue, acks);
        lease_args(&mut inv, max, visibility_ms, consumer, address);
        let reply: Value = self
            .run(
                &format!("acking and leasing in queue {queue:?}"),
                None,
                &inv,
            )
            .await?;
        let mut row = Row::new("ack and lease", reply)?;
        let acked = ack_results(acks, row.next()?)?;
        let leased = deliveries(queue, row.next()?)?;
        Ok((acked, leased))
    }

    /// Fails a delivery: it retries after `retry_delay_ms` (or the backoff's delay), or
    /// dies on its last attempt or with `dead_letter`. Returns the job's state and, for a
    /// retry, when it runs.
    pub(crate) async fn nack(
        &self,
        lease: &LeaseId,
        error: String,
        retry_delay_ms: Option<u64>,
        dead_letter: bool,
    ) -> Result<(JobState, Option<Millis>), BrokerError> {
        let keys = QueueKeys::new(&lease.queue);
        let mut inv = Call::new("nack", keys.base());
        inv.arg(&*lease.queue)
            .arg(lease.seq)
            .arg(format!("{:x}", lease.nonce))
            .arg(error)
            .arg(retry_delay_ms.map_or_else(String::new, |d| d.to_string()))
            .arg(if dead_letter { "1" } else { "0" })
            .arg(jitter_seed());
        let reply: Value = self
            .run(&format!("nacking lease {lease}"), Some(lease), &inv)
            .await?;
        let mut row = Row::new("nack", reply)?;
        let outcome: String = row.next()?;
        if outcome == "dead" {
            return Ok((JobState::Dead, None));
        }
        let at: Millis = row.next()?;
        let now: Millis = row.next()?;
        let state = if at <= now {
            JobState::Pending
        } else {
            JobState::Retrying
        };
        Ok((state, Some(at)))
    }

    /// Puts back the deliveries `(seq, nonce)` of queue `name` that a closed consume
    /// stream held: visible again at once, each a failed attempt, all in one script.
    /// Returns how many were still live to put back.
    pub(crate) async fn release(
        &self,
        name: &str,
        error: &str,
        held: impl IntoIterator<Item = (u64, u64)>,
    ) -> Result<u64, BrokerError> {
        let keys = QueueKeys::new(name);
        let mut inv = Call::new("release", keys.base());
        inv.arg(name).arg(error).arg(jitter_seed());
        for (seq, nonce) in held {
            inv.arg(seq).arg(format!("{nonce:x}"));
        }
        self.run(&format!("releasing leases of queue {name:?}"), None, &inv)
            .await
    }

    /// Puts back the leases `(seq, nonce)` of queue `name` that a consume stream took
    /// ahead of its worker's credits and never delivered: visible again at once, as if
    /// never leased (no attempt counted, rate tokens returned), all in one script.
    /// Returns how many were still live to put back.
    pub(crate) async fn unlease(
        &self,
        name: &str,
        held: impl IntoIterator<Item = (u64, u64)>,
    ) -> Result<u64, BrokerError> {
        let keys = QueueKeys::new(name);
        let mut inv = Call::new("unlease", keys.base());
        inv.arg(name);
        for (seq, nonce) in held {
            inv.arg(seq).arg(format!("{nonce:x}"));
        }
        self.run(
            &format!("putting back leases of queue {name:?}"),
            None,
            &inv,
        )
        .await
    }

    /// Moves a live lease's deadline to now + `visibility_ms`; returns it.
    pub(crate) async fn extend(
        &self,
        lease: &LeaseId,
        visibility_ms: u64,
    ) -> Result<Millis, BrokerError> {
        let keys = QueueKeys::new(&lease.queue);
        let mut inv = Call::new("extend", keys.base());
        inv.arg(&*lease.queue)
            .arg(lease.seq)
            .arg(format!("{:x}", lease.nonce))
            .arg(visibility_ms);
        self.run(&format!("extending lease {lease}"), Some(lease), &inv)
            .await
    }

    /// The job with `id`, live or in history.
    pub(crate) async fn get(&self, queue: &str, id: &Uuid) -> Result<Option<Job>, BrokerError> {
        let keys = QueueKeys::new(queue);
        let mut inv = Call::new("get", keys.base());
        inv.arg(queue).arg(id.to_string());
        let reply: Value = self
            .run(&format!("reading a job of queue {queue:?}"), None, &inv)
            .await?;
        match reply {
            Value::Nil => Ok(None),
            v => job_of(queue, v).map(Some),
        }
    }

    /// Cancels a scheduled, pending or retrying job; returns its record as cancelled.
    pub(crate) async fn cancel(&self, queue: &str, id: &Uuid) -> Result<Job, BrokerError> {
        let keys = QueueKeys::new(queue);
        let mut inv = Call::new("cancel", keys.base());
        inv.arg(queue).arg(id.to_string()).arg(jitter_seed());
        let reply: Value = self
            .run(&format!("cancelling a job of queue {queue:?}"), None, &inv)
            .await?;
        let mut row = Row::new("cancel", reply)?;
        let now: Millis = row.next()?;
        let seq: u64 = row.next()?;
        let map: HashMap<String, Vec<u8>> = row.next()?;
        let mut job = Fields { queue, seq, map }.into_job()?;
        job.state = JobState::Cancelled;
        job.finished_at = Some(now);
        job.updated_at = now;
        Ok(job)
    }

    /// Deletes a job whatever its state; returns its record as it was.
    pub(crate) async fn delete_job(&self, queue: &str, id: &Uuid) -> Result<Job, BrokerError> {
        let keys = QueueKeys::new(queue);
        let mut inv = Call::new("delete_job", keys.base());
        inv.arg(queue).arg(id.to_string()).arg(jitter_seed());
        let reply: Value = self
            .run(&format!("deleting a job of queue {queue:?}"), None, &inv)
            .await?;
        let mut row = Row::new("delete_job", reply)?;
        let seq: u64 = row.next()?;
        let map: HashMap<String, Vec<u8>> = row.next()?;
        Fields { queue, seq, map }.into_job()
    }

    /// Jobs in `state` (every live one if `None`), oldest first, after seq `after_seq`;
    /// returns the page and the seq to continue after, if more match.
    pub(crate) async fn list(
        &self,
        queue: &str,
        state: Option<JobState>,
        page_size: usize,
        after_seq: Option<u64>,
    ) -> Result<(Vec<Job>, Option<u64>), BrokerError> {
        let keys = QueueKeys::new(queue);
        let mut inv = Call::new("list", keys.base());
        inv.arg(queue)
            .arg(state.map_or("", JobState::as_str))
            .arg(after_seq.unwrap_or(0))
            .arg(page_size.max(1));
        let reply: Value = self
            .run(&format!("listing jobs of queue {queue:?}"), None, &inv)
            .await?;
        let mut row = Row::new("list", reply)?;
        let more: i64 = row.next()?;
        let jobs = row
            .rest()
            .map(|v| job_of(queue, v))
            .collect::<Result<Vec<_>, _>>()?;
        let next = if more == 1 {
            jobs.last().map(|j| j.seq)
        } else {
            None
        };
        Ok((jobs, next))
    }

    /// The newest finished jobs, newest first.
    pub(crate) async fn history(&self, queue: &str, limit: usize) -> Result<Vec<Job>, BrokerError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let keys = QueueKeys::new(queue);
        let mut inv = Call::new("history", keys.base());
        inv.arg(queue).arg(limit);
        let rows: Vec<Value> = self
            .run(
                &format!("reading the history of queue {queue:?}"),
                None,
                &inv,
            )
            .await?;
        rows.into_iter().map(|v| job_of(queue, v)).collect()
    }

    /// Expires due leases and makes due timers visible; returns how many jobs changed
    /// and how many dead letters wait to move. Idempotent; zeros for a missing queue.
    pub(crate) async fn sweep(&self, queue: &str) -> Result<Swept, BrokerError> {
        let keys = QueueKeys::new(queue);
        let mut inv = Call::new("sweep", keys.base());
        inv.arg(queue).arg(jitter_seed());
        let (changed, dead_letters) = self
            .run(&format!("sweeping queue {queue:?}"), None, &inv)
            .await?;
        Ok(Swept {
            changed,
            dead_letters,
        })
    }

    /// Moves the queue's dead letters into their dead-letter queues (created with the
    /// default policy if missing), with the `x-sluice-*` headers of their death and their
    /// origin recorded. Safe to retry: a letter is stored once. Returns how many letters
    /// left the outbox.
    pub(crate) async fn move_dead_letters(&self, queue: &str) -> Result<u64, BrokerError> {
        let keys = QueueKeys::new(queue);
        let mut moved = 0;
        loop {
            let mut inv = Call::new("dead_letters", keys.base());
            inv.arg(queue).arg(DEAD_LETTER_BATCH);
            let rows: Vec<Value> = self
                .run(
                    &format!("reading dead letters of queue {queue:?}"),
                    None,
                    &inv,
                )
                .await?;
            if rows.is_empty() {
                return Ok(moved);
            }
            let full = rows.len() == DEAD_LETTER_BATCH;
            let mut done = Vec::with_capacity(rows.len());
            for row in rows {
                let mut r = Row::new("dead letters", row)?;
                let seq: u64 = r.next()?;
                let map: HashMap<String, Vec<u8>> = r.next()?;
                if !map.is_empty() {
                    let job = Fields { queue, seq, map }.into_job()?;
                    self.insert_dead_letter(queue, seq, job).await?;
                }
                done.push(seq);
            }
            let mut inv = Call::new("dead_letters_done", keys.base());
            inv.arg(queue);
            for seq in &done {
                inv.arg(*seq);
            }
            let n: u64 = self
                .run(
                    &format!("clearing dead letters of queue {queue:?}"),
                    None,
                    &inv,
                )
                .await?;
            moved += n;
            if !full {
                return Ok(moved);
            }
        }
    }

    /// Stores the dead job `seq` of `origin` in its dead-letter queue, once.
    async fn insert_dead_letter(
        &self,
        origin: &str,
        seq: u64,
        job: Job,
    ) -> Result<(), BrokerError> {
        let Some(target) = job.dead_letter_queue.clone() else {
            return Ok(());
        };
        self.ensure(&target, &QueuePolicy::default_for(&target), false)
            .await?;
        let mut headers = job.headers;
        headers.insert(HEADER_ORIGINAL_QUEUE.into(), origin.to_owned());
        headers.insert(HEADER_ATTEMPTS.into(), job.attempts.to_string());
        headers.insert(HEADER_LAST_ERROR.into(), job.last_error.unwrap_or_default());
        headers.insert(
            HEADER_DEAD_LETTERED_AT.into(),
            job.finished_at.unwrap_or(job.updated_at).to_string(),
        );
        let keys = QueueKeys::new(&target);
        let mut inv = Call::new("insert_dead_letter", keys.base());
        inv.arg(&target)
            .arg(format!("{origin}/{seq}"))
            .arg(job.id.to_string())
            .arg(&job.kind)
            .arg(job.payload.as_ref())
            .arg(encode_headers(&headers))
            .arg(job.priority)
            .arg(origin);
        self.run::<i64>(
            &format!("moving a dead letter to queue {target:?}"),
            None,
            &inv,
        )
        .await
        .map(|_| ())
    }

    /// The queue's counters.
    pub(crate) async fn counts(&self, queue: &str) -> Result<QueueCounts, BrokerError> {
        let keys = QueueKeys::new(queue);
        let mut inv = Call::new("counts", keys.base());
        inv.arg(queue);
        let n: Vec<u64> = self
            .run(&format!("counting queue {queue:?}"), None, &inv)
            .await?;
        let [
            pending,
            scheduled,
            leased,
            retrying,
            enqueued,
            completed,
            failed,
            dead,
            cancelled,
            oldest_pending_age_ms,
            consumers,
            paused,
            max_in_flight,
            rate_limit_per_second,
            rate_limit_burst,
            rate_tokens,
            rate_limited_ms,
            in_flight_limited_ms,
            enqueued_in_window,
            acked_in_window,
            by_consumer,
        ] = n[..]
        else {
            return Err(malformed("counts", format!("{} numbers", n.len())));
        };
        Ok(QueueCounts {
            pending,
            scheduled,
            leased,
            retrying,
            enqueued,
            completed,
            failed,
            dead,
            cancelled,
            oldest_pending_age_ms,
            consumers: consumers as u32,
            paused: paused == 1,
            max_in_flight: max_in_flight as u32,
            rate_limit_per_second: rate_limit_per_second as u32,
            rate_limit_burst: rate_limit_burst as u32,
            rate_tokens,
            rate_limited_ms,
            in_flight_limited_ms,
            enqueue_rate: enqueued_in_window as f64 / WINDOW_SECS as f64,
            ack_rate: acked_in_window as f64 / WINDOW_SECS as f64,
            created_by_consumer: by_consumer == 1,
        })
    }

    /// Consumers seen, by name.
    pub(crate) async fn consumers(
        &self,
        queue: &str,
    ) -> Result<Vec<(Arc<str>, ConsumerState)>, BrokerError> {
        let mut c = self.conn.clone();
        let all: Vec<(String, String)> = redis::cmd("HGETALL")
            .arg(QueueKeys::new(queue).key("consumers"))
            .query_async(&mut c)
            .await
            .map_err(|e| unavailable(&format!("reading consumers of queue {queue:?}"), e))?;
        let mut out: Vec<(Arc<str>, ConsumerState)> = Vec::with_capacity(all.len());
        for (name, json) in all {
            let r: ConsumerRecord =
                serde_json::from_str(&json).map_err(|e| malformed("a consumer", e))?;
            out.push((
                Arc::from(name),
                ConsumerState {
                    address: r.a,
                    leases_held: r.h as u32,
                    last_seen: r.s as Millis,
                    done: r.d as u64,
                    failed: r.f as u64,
                },
            ));
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }

    /// The earliest time something is due (a timer, a lease deadline, or the rate
    /// limit's next token while it holds visible jobs back), for the sweeper.
    pub(crate) async fn next_due(&self, queue: &str) -> Result<Option<Millis>, BrokerError> {
        let keys = QueueKeys::new(queue);
        let mut inv = Call::new("next_due", keys.base());
        inv.arg(queue);
        self.run(&format!("reading when queue {queue:?} is due"), None, &inv)
            .await
    }

    /// Notes that the waiter `token` is about to wait for visible jobs of `queue`, for
    /// `for_ms` (see queue/waiting.lua): until then the scripts that make jobs visible
    /// publish wake-ups. Look once more after it, before waiting.
    pub(crate) async fn note_waiting(
        &self,
        queue: &str,
        token: &str,
        for_ms: u64,
    ) -> Result<(), BrokerError> {
        let keys = QueueKeys::new(queue);
        let mut inv = Call::new("waiting", keys.base());
        inv.arg(queue).arg(token).arg(for_ms);
        let _: i64 = self
            .run(&format!("waiting for queue {queue:?}"), None, &inv)
            .await?;
        Ok(())
    }
}

pub(crate) mod binding;
mod coalesce;
mod library;
#[cfg(test)]
mod model;
pub(crate) mod redrive;
pub(crate) mod schedule;
#[cfg(test)]
mod test_clock;
#[cfg(test)]
mod tests;
