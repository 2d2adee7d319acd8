//! The Redis queue scripts against the queue's reference model: the randomized model test
//! of the in-process queue (`broker/domain/queue/model_tests.rs`) drives a
//! [`QueueStore`] (through its test clock, so every call names its time) with the same
//! generator and checks it step by step against the same model.
//!
//! Every operation's answer is compared: enqueue outcomes (ids, duplicates, a full
//! queue), leased seqs in order and each delivery, ack/nack/extend of live, stale,
//! repeated and forged leases, cancel (the record it returns), purge, sweeps, get, list
//! pages and history. After every step the counters and the consumers are compared, every
//! 4th step every job through `list`, `history` and `get`, payloads and headers included.
//! Dead letters are moved after every step (`move_dead_letters`, as the engine's caller
//! does after each call that can kill jobs) and each one is read back from the
//! dead-letter queue. After the last step everything is drained, and with no history
//! kept no key of either queue may be left but its meta, consumers and rates hashes.
//!
//! Where the store differs on purpose (see `queue.rs`'s module docs) the run adapts:
//!
//! * An ack does not say how long the lease was held, nor tell a repeat ack from the
//!   first: both are `Ok`.
//! * A lease takes at least one job (`max` 0 is 1); the drain leases at most 4096 at once.
//! * Cancel and purge expire due leases and fire due timers first (as lease and sweep
//!   do), so the model ticks before them.
//! * Leases that expire in one sweep die in deadline order, then by their seq as text
//!   (the leased zset's order): that is the model's order for them, and so their order in
//!   the history and the dead-letter queue.
//! * The oldest pending age is that of the oldest front of each priority.
//! * Job ids are the node's UUIDv7s; the model takes them from the answers.
//! * A redrive goes through [`QueueStore::redrive_targets`] and [`QueueStore::redrive`],
//!   which report counts, not jobs: the jobs moved are those that left the dead-letter
//!   queue's live jobs, read back from the origin in the order it stored them. The model's `max` 0 (move nothing) is
//!   not sent (the store's 0 is "no cap").
//!
//! Not compared: the store's internals (its zsets and lists; only the leftover keys at the
//! end), lease checks without settling (the store has none), which leases expired in a
//! sweep (it does not say; their effects are compared), the enqueue and ack rates and the
//! consumers' addresses and last-seen times.
//!
//! The same environment variables as the in-process run choose seeds and steps
//! (`SLUICE_MODEL_SEED`, `SLUICE_MODEL_SEEDS`, `SLUICE_MODEL_FIRST_SEED`,
//! `SLUICE_MODEL_STEPS`, `SLUICE_MODEL_TRACE`), e.g.
//! `SLUICE_MODEL_SEEDS=200 cargo nextest run --lib redis_scripts_follow_the_model`.

use std::sync::atomic::{AtomicU64, Ordering};

use tokio::runtime::Runtime;

use super::*;
use crate::broker::domain::queue::model_tests::{
    BULK_SEEDS, Ctx, Model, ORDINARY_SEEDS, Purged, QueueUnderTest, Routed, check_observable,
    run_seeds,
};
use crate::broker::domain::queue::{FailOutcome, LeaseCheck, Redriven};
use crate::broker::engine::redis::conn::connect;
use crate::broker::testing::redis::RedisServer;

/// The most jobs one lease takes here (a nonce is sent per job it may take).
const MAX_LEASE: usize = 4096;
/// Plenty for `list` and `history` of every job of a run.
const ALL: usize = 100_000;

/// One Redis server for a run, and a clock-driven store on it.
struct Env {
    rt: Arc<Runtime>,
    store: QueueStore,
    clock: Arc<AtomicU64>,
    /// Dropped last: kills the server.
    _server: RedisServer,
}

/// One queue of the store, with the run's runtime and clock.
struct RedisQueue {
    name: &'static str,
    rt: Arc<Runtime>,
    store: QueueStore,
    clock: Arc<AtomicU64>,
}

impl RedisQueue {
    /// Runs `f` with the store's time set to `now`.
    fn at<T>(&self, now: Millis, f: impl Future<Output = T>) -> T {
        self.clock.store(now, Ordering::SeqCst);
        self.rt.block_on(f)
    }

    /// Runs a call that does not depend on time (the clock stays where it is).
    fn run<T>(&self, f: impl Future<Output = T>) -> T {
        self.rt.block_on(f)
    }

    /// Every key of this queue, without its prefix.
    fn keys(&self) -> Vec<String> {
        let base = QueueKeys::new(self.name).base().to_owned();
        let mut c = self.store.conn.clone();
        let mut keys: Vec<String> = self
            .run(
                redis::cmd("KEYS")
                    .arg(format!("{base}:*"))
                    .query_async::<Vec<String>>(&mut c),
            )
            .expect("KEYS");
        for k in &mut keys {
            *k = k[base.len()..].to_owned();
        }
        keys.sort();
        keys
    }
}

impl QueueUnderTest for RedisQueue {
    type Env = Env;
    const IN_PROCESS: bool = false;
    const FULL_CHECK_EVERY: usize = 4;

    fn open(env: &Env, name: &'static str, policy: QueuePolicy) -> Self {
        let q = Self {
            name,
            rt: env.rt.clone(),
            store: env.store.clone(),
            clock: env.clock.clone(),
        };
        match q.run(q.store.delete(name)) {
            Ok(()) | Err(BrokerError::NotFound(_)) => {}
            Err(e) => panic!("deleting queue {name}: {e}"),
        }
        assert!(q.keys().is_empty(), "{name}: keys left: {:?}", q.keys());
        q.run(q.store.create(name, &policy)).expect("create");
        q
    }

    fn enqueue(&mut self, now: Millis, jobs: Vec<NewJob>) -> Result<Vec<Enqueued>, BrokerError> {
        self.at(now, self.store.enqueue(self.name, jobs))
    }

    fn lease(
        &mut self,
        now: Millis,
        max: usize,
        visibility_ms: u64,
        consumer: &Arc<str>,
        address: &str,
    ) -> Vec<Delivery> {
        let max = max.min(MAX_LEASE);
        self.at(
            now,
            self.store
                .lease(self.name, max, Some(visibility_ms), consumer, address),
        )
        .expect("lease")
    }

    fn ack(
        &mut self,
        now: Millis,
        lease: &LeaseId,
        result: Option<Bytes>,
    ) -> Result<Option<Millis>, BrokerError> {
        let mut out = self.at(
            now,
            self.store.ack(self.name, vec![(lease.clone(), result)]),
        )?;
        assert_eq!(out.len(), 1, "one result per ack");
        out.remove(0).map(|()| None)
    }

    fn nack(
        &mut self,
        now: Millis,
        lease: &LeaseId,
        error: String,
        retry_delay_ms: Option<u64>,
        dead_letter: bool,
    ) -> Result<FailOutcome, BrokerError> {
        let (state, at) = self.at(
            now,
            self.store.nack(lease, error, retry_delay_ms, dead_letter),
        )?;
        Ok(match (state, at) {
            (JobState::Dead, _) => FailOutcome::Dead,
            (_, Some(at)) => FailOutcome::Retry { at },
            (state, None) => panic!("a nack answered {state:?} without a time"),
        })
    }

    fn extend(
        &mut self,
        now: Millis,
        lease: &LeaseId,
        visibility_ms: u64,
    ) -> Result<Millis, BrokerError> {
        self.at(now, self.store.extend(lease, visibility_ms))
    }

    fn check_lease(&self, _: Millis, _: &LeaseId) -> Option<Result<LeaseCheck, BrokerError>> {
        None
    }

    fn cancel(&mut self, now: Millis, id: &Uuid) -> Result<Job, BrokerError> {
        self.at(now, self.store.cancel(self.name, id))
    }

    fn delete(&mut self, now: Millis, id: &Uuid) -> Result<Job, BrokerError> {
        self.at(now, self.store.delete_job(self.name, id))
    }

    fn purge(&mut self, now: Millis) -> Purged {
        Purged::Count(self.at(now, self.store.purge(self.name)).expect("purge"))
    }

    fn tick(&mut self, now: Millis) {
        self.at(now, self.store.sweep(self.name)).expect("sweep");
    }

    fn order_expired(&self, due: &mut [(Millis, u64)]) {
        // ZRANGEBYSCORE order: by deadline, then by member, the seq as text.
        due.sort_by_cached_key(|(deadline, seq)| (*deadline, seq.to_string()));
    }

    fn take_expired(&mut self) -> Option<Vec<u64>> {
        None
    }

    fn route_dead_letters(&mut self, _dlq: &mut Self, now: Millis) -> Routed {
        Routed::Moved(
            self.at(now, self.store.move_dead_letters(self.name))
                .expect("move_dead_letters"),
        )
    }

    fn redrive(
        &mut self,
        main: &mut Self,
        now: Millis,
        ids: &[Uuid],
        max: usize,
        allowed: bool,
    ) -> Option<(Vec<Redriven>, Vec<Uuid>)> {
        // The model's `max` 0 moves nothing; the store's `max_jobs` 0 is "no cap".
        if ids.is_empty() && max == 0 {
            return Some((Vec::new(), Vec::new()));
        }
        let max_jobs = max as u64;
        // What the redrive takes is what leaves the dead-letter queue's live jobs, in
        // seq order (the order the model moves them in).
        let before = self.list(None, 0, ALL).0;
        let targets = self
            .at(now, self.store.redrive_targets(self.name, ids, max_jobs))
            .expect("redrive_targets");
        assert!(
            targets.iter().all(|t| t == main.name),
            "redrive targets {targets:?} outside {}",
            main.name
        );
        let allowed = if allowed { targets } else { Default::default() };
        let report = self
            .at(
                now,
                self.store.redrive(self.name, ids, 0, max_jobs, &allowed),
            )
            .expect("redrive");
        let after: std::collections::HashSet<Uuid> =
            self.list(None, 0, ALL).0.iter().map(|j| j.id).collect();
        let taken: std::collections::HashSet<Uuid> = before
            .iter()
            .filter(|j| !after.contains(&j.id))
            .map(|j| j.id)
            .collect();
        // In the order the origin stored them (its live jobs by seq), which the model
        // checks against the order it moves them in.
        let moved: Vec<Redriven> = main
            .list(None, 0, ALL)
            .0
            .into_iter()
            .filter(|j| taken.contains(&j.id))
            .map(|stored| Redriven {
                target: main.name.to_owned(),
                job_id: stored.id,
                kind: stored.kind,
                payload: stored.payload,
                headers: stored.headers,
                priority: stored.priority,
            })
            .collect();
        assert_eq!(
            moved.len(),
            taken.len(),
            "redriven jobs missing from {}",
            main.name
        );
        let expected: std::collections::BTreeMap<String, u64> = if moved.is_empty() {
            Default::default()
        } else {
            [(main.name.to_owned(), moved.len() as u64)].into()
        };
        assert_eq!(report.by_origin, expected, "redrive report");
        Some((moved, report.skipped))
    }

    fn get(&self, id: &Uuid) -> Option<Job> {
        self.run(self.store.get(self.name, id)).expect("get")
    }

    fn list(&self, state: Option<JobState>, after: u64, limit: usize) -> (Vec<Job>, Option<u64>) {
        self.run(
            self.store
                .list(self.name, state, limit.min(ALL), Some(after)),
        )
        .expect("list")
    }

    fn history(&self, limit: usize) -> Vec<Job> {
        self.run(self.store.history(self.name, limit.min(ALL)))
            .expect("history")
    }

    fn set_policy(&mut self, policy: QueuePolicy) {
        self.run(self.store.set_policy(self.name, &policy))
            .expect("set_policy");
    }

    fn set_paused(&mut self, paused: bool) {
        self.run(self.store.set_paused(self.name, paused))
            .expect("set_paused");
    }

    fn live_jobs(&self) -> u64 {
        let c = self.run(self.store.counts(self.name)).expect("counts");
        c.pending + c.scheduled + c.leased + c.retrying
    }

    fn counts(&self, now: Millis) -> QueueCounts {
        self.at(now, self.store.counts(self.name)).expect("counts")
    }

    fn consumers(&self) -> Vec<(Arc<str>, ConsumerState)> {
        self.run(self.store.consumers(self.name))
            .expect("consumers")
    }

    fn check(&self, ctx: &Ctx, m: &Model, now: Millis, full: bool) {
        check_observable(ctx, self, m, now, full);
    }

    fn check_drained(&mut self, ctx: &Ctx) {
        let (mut policy, _) = self
            .run(self.store.info(self.name))
            .expect("info")
            .expect("the queue exists");
        policy.history_limit = 0;
        QueueUnderTest::set_policy(self, policy);
        let mut keys = self.keys();
        // The rates hash is bounded (40 fields) and kept while the queue is.
        keys.retain(|k| k != ":rates");
        if keys != [":consumers", ":meta"] {
            ctx.fail(format_args!("{}: keys left: {keys:?}", self.name));
        }
    }
}

fn env() -> Env {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    let server = RedisServer::start();
    let conn = rt.block_on(connect(&[server.url()])).expect("connect");
    let clock = Arc::new(AtomicU64::new(0));
    Env {
        rt: Arc::new(rt),
        store: QueueStore::with_clock(conn, clock.clone()),
        clock,
        _server: server,
    }
}

/// Small queues (depth 4-40, history 0-40): keys, limits and history evictions collide.
#[test]
fn redis_scripts_follow_the_model() {
    run_seeds::<RedisQueue>(&env(), ORDINARY_SEEDS, 12, 300);
}

/// Deep queues and batches of up to 200 jobs.
#[test]
fn redis_scripts_follow_the_model_in_bulk() {
    run_seeds::<RedisQueue>(&env(), BULK_SEEDS, 2, 200);
}
