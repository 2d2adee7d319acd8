//! The broker's shared state: a cheap-clone [`Broker`] handle over `Arc`.
//!
//! Each queue and topic sits behind its own std mutex, held only for short, non-async
//! sections. The one place that holds several at once is a publish to a topic with bound
//! queues (topic first, then queues in name order), which keeps it atomic and deadlock-free:
//! every other path holds at most one queue lock at a time.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLockReadGuard};
use std::time::Duration;

use bytes::Bytes;
use dashmap::DashMap;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::broker::auth::{Access, Action};
use crate::broker::error::BrokerError;
use crate::broker::limits::{
    Limits, MAX_BACKOFF_STEPS, MAX_DEDUP_WINDOW_MS, MAX_HISTORY_LIMIT, MAX_QUEUE_DEPTH,
    MAX_REDRIVE_RATE, MAX_RETRY_DELAY_MS, MAX_TOPIC_BINDINGS, check_count, check_duration_ms,
};
use crate::broker::memory::{Accounted, MemoryBudget};
use crate::broker::names::{Pattern, validate_name};
use crate::broker::observe::Observer;
use crate::broker::queue::{
    Backoff, ConsumerState, DeadLetter, Delivery, Enqueued, FailOutcome, Job, JobState, LeaseId,
    LeaseIdError, MAX_VISIBILITY_MS, NewJob, Queue, QueueCounts, QueuePolicy,
};
use crate::broker::store::{
    Batch, Commit, DurableListener, Journal, RecoveryError, RecoveryReport, SnapshotQueue,
    SnapshotTopic, Storage, StoreConfig, StoreError, recover,
};
use crate::broker::subscription::{self, SubscribeSpec, SubscriberShared, Subscription};
use crate::broker::sync::lock;
use crate::broker::time::{Millis, now_ms};
use crate::broker::topic::{Appended, NewMessage, Retention, Topic, validate_retention};

/// Longest long-poll wait.
pub const MAX_LEASE_WAIT_MS: u64 = 60_000;
/// Header carrying the topic sequence on jobs created by a binding.
pub const HEADER_TOPIC_SEQUENCE: &str = "x-sluice-topic-sequence";

/// The result of a change that is applied and appended to the log but may not be durable
/// yet: [`Broker::confirm`] waits for it. Log positions only grow, so confirming changes in
/// the order they were logged never waits out of turn.
#[derive(Debug)]
#[must_use = "a change is acknowledged only after it is confirmed durable"]
pub struct Logged<T> {
    value: T,
    commit: Commit,
}

/// Broker settings that are not per queue or topic.
#[derive(Debug, Clone)]
pub struct BrokerConfig {
    /// Request limits.
    pub limits: Limits,
    /// How often leases are expired and scheduled jobs promoted when nobody is leasing.
    pub tick_interval: Duration,
}

impl Default for BrokerConfig {
    fn default() -> Self {
        Self {
            limits: Limits::default(),
            tick_interval: Duration::from_millis(10),
        }
    }
}

pub(crate) struct SharedQueue {
    pub(crate) name: Arc<str>,
    pub(crate) queue: Mutex<Queue>,
    /// Wakes one waiting lease (a long poll, or a consume stream with credits) when jobs
    /// may have become visible; [`SharedQueue::wake_one`] says how the wake-up is passed on.
    pub(crate) ready: Notify,
    deleted: AtomicBool,
}

impl SharedQueue {
    /// Wakes one waiter, not all: with many idle workers on a queue, waking every one per
    /// enqueue would have all but one take the lock and find nothing. The woken waiter
    /// leases through [`Broker::with_queue`], which calls this again while jobs remain
    /// visible, so a batch reaches as many waiters as it has jobs, one hand-off at a time.
    /// A woken waiter that leaves without leasing drops its `Notified`, and tokio passes
    /// the wake-up to the next waiter (or keeps it for the next to come).
    pub(crate) fn wake_one(&self) {
        self.ready.notify_one();
    }
}

pub(crate) struct SharedTopic {
    pub(crate) name: Arc<str>,
    pub(crate) topic: Mutex<Topic>,
    /// The sequence after the newest message that is durable under the fsync policy:
    /// subscriptions read up to it (without the topic lock to check it), so nobody ever
    /// sees a message a crash could take back, or a sequence that could name another
    /// message after a restart. Advanced by the log's writer once a publish's record is
    /// durable (see [`DurableListener`]); with memory storage, by the publish itself.
    pub(crate) durable_seq: AtomicU64,
    pub(crate) subscribers: Mutex<Vec<Arc<SubscriberShared>>>,
    pub(crate) deleted: AtomicBool,
    pub(crate) gaps: AtomicU64,
}

impl SharedTopic {
    fn wake_subscribers(&self) {
        for sub in lock(&self.subscribers).iter() {
            sub.wake();
        }
    }

    /// Makes the messages before sequence `end` readable and wakes the subscriptions.
    fn advance_durable(&self, end: u64) {
        if self.durable_seq.fetch_max(end, Ordering::AcqRel) < end {
            self.wake_subscribers();
        }
    }
}

/// The log's writer tells a topic the end of each publish once its record is durable.
impl DurableListener for SharedTopic {
    fn durable(&self, end: u64) {
        self.advance_durable(end);
    }
}

/// What `--max-queues` counts: every queue, and every dead-letter queue a policy names
/// that does not exist yet. A dead-letter queue is created by its first dead letter, which
/// must never be refused, so its slot is taken when a policy names it (the queue's
/// creation, CreateQueue, UpdateQueue) and the limit is checked then.
#[derive(Default)]
struct QueueCatalog {
    /// Dead-letter queue names the policies of existing queues name, with how many do.
    dead_letter_refs: HashMap<Arc<str>, u32>,
    /// How many of those names are not queues (yet): slots held for them.
    reserved: usize,
}

/// How a queue comes to be created, for [`Broker::create_queue_slot`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Creation {
    /// On a request: refused past `--max-queues`.
    Counted,
    /// For a dead letter: its slot was taken when a policy named it, so it is never
    /// refused; a dead-letter queue of its own it takes only if that fits.
    DeadLetters,
}

/// Where published messages go besides the topic's log: the live subscriptions, and the
/// bindings that copy a topic's messages into queues.
#[derive(Default)]
pub(crate) struct Routing {
    pub(crate) subscriptions: Vec<Arc<SubscriberShared>>,
    bindings: Vec<(Pattern, Arc<str>)>,
}

pub(crate) struct Inner {
    pub(crate) config: BrokerConfig,
    queues: DashMap<Arc<str>, Arc<SharedQueue>>,
    /// Held while queues are created or deleted and while a policy's dead-letter queue
    /// changes (never while a queue or registry lock is held), so the queue count is exact.
    catalog: Mutex<QueueCatalog>,
    pub(crate) topics: DashMap<Arc<str>, Arc<SharedTopic>>,
    /// Serialises topic creation, subscription registration and binding changes, so a new
    /// topic and a new subscription always see each other.
    pub(crate) registry: Mutex<Routing>,
    pub(crate) shutdown: CancellationToken,
    next_subscription: AtomicU64,
    /// Receives lease-to-ack and publish-to-deliver timings once something measures them.
    pub(crate) observer: OnceLock<Arc<dyn Observer>>,
    /// The write-ahead log; `None` with memory storage.
    journal: Option<Arc<Journal>>,
    /// Retained payload bytes, against `--max-memory-bytes`.
    memory: MemoryBudget,
    /// The stats snapshot shared by watchers (see [`crate::broker::stats`]).
    pub(crate) stats: crate::broker::stats::StatsHub,
    /// What recovery did at startup (WAL storage only), for Stats.
    recovery: OnceLock<RecoveryReport>,
}

/// The broker. Clone it freely: clones share one state.
#[derive(Clone)]
pub struct Broker {
    pub(crate) inner: Arc<Inner>,
}

/// Parameters of a lease request, already defaulted by the caller where it wants.
#[derive(Debug, Clone)]
pub struct LeaseParams {
    /// Most jobs.
    pub max_jobs: usize,
    /// Lease duration; `None` takes the queue policy's.
    pub visibility_timeout_ms: Option<u64>,
    /// Long-poll wait.
    pub wait_ms: u64,
    /// Consumer name.
    pub consumer: String,
    /// Peer address, for ListConsumers.
    pub address: String,
}

/// Changes to a queue policy; `None` keeps the current (or default) value.
#[derive(Debug, Clone, Default)]
pub struct PolicyPatch {
    /// Default lease duration.
    pub visibility_timeout_ms: Option<u64>,
    /// Default max attempts.
    pub max_attempts: Option<u32>,
    /// Backoff.
    pub backoff: Option<crate::broker::queue::Backoff>,
    /// Dead-letter queue.
    pub dead_letter_queue: Option<String>,
    /// Max depth.
    pub max_depth: Option<u64>,
    /// Dedup window.
    pub dedup_window_ms: Option<u64>,
    /// Topic bindings (replaced whole).
    pub topic_bindings: Option<Vec<String>>,
    /// History limit.
    pub history_limit: Option<u32>,
}

/// A queue's description.
#[derive(Debug, Clone)]
pub struct QueueInfo {
    /// Name.
    pub name: String,
    /// Policy.
    pub policy: QueuePolicy,
    /// Paused.
    pub paused: bool,
}

/// Stats of one topic.
#[derive(Debug, Clone, Default)]
pub struct TopicCounts {
    /// Name.
    pub name: String,
    /// Oldest retained sequence (0 if empty).
    pub first_sequence: u64,
    /// Newest appended sequence (0 if none). It counts, as the retained messages do, a
    /// publish whose record is not yet durable (for about one fsync), which subscribers
    /// are delivered only once it is.
    pub last_sequence: u64,
    /// Retained messages.
    pub retained_messages: u64,
    /// Retained payload bytes.
    pub retained_bytes: u64,
    /// Open matching subscriptions.
    pub subscribers: u32,
    /// Gaps reported.
    pub gaps: u64,
    /// Published since start.
    pub published: u64,
    /// Published per second, last 10 s.
    pub publish_rate: f64,
}

/// A whole-broker snapshot of counters.
#[derive(Debug, Clone, Default)]
pub struct StatsSnapshot {
    /// Per queue, by name.
    pub queues: Vec<(String, QueueCounts)>,
    /// Per topic, by name.
    pub topics: Vec<TopicCounts>,
    /// When taken.
    pub taken_at: Millis,
    /// The memory budget for retained payload bytes (0: none).
    pub memory_budget_bytes: u64,
    /// Payload bytes retained now, broker-wide.
    pub memory_used_bytes: u64,
    /// The storage and its state.
    pub storage: StorageStatus,
}

/// The broker's storage, as Stats shows it.
#[derive(Debug, Clone, Default)]
pub struct StorageStatus {
    /// `"wal"` or `"memory"`.
    pub engine: &'static str,
    /// The fsync policy (`None` with memory storage).
    pub fsync: Option<String>,
    /// Why the log failed (fail-stop), if it did.
    pub failure: Option<String>,
    /// What recovery did at startup.
    pub recovery: RecoveryReport,
}

/// The result of a redrive.
#[derive(Debug, Clone, Default)]
pub struct RedriveOutcome {
    /// Jobs moved back.
    pub redriven: u64,
    /// Requested ids that could not be moved.
    pub skipped: Vec<Uuid>,
}

impl Broker {
    /// A new, empty broker. Starts its expiry task, so it must be called inside a Tokio
    /// runtime; the task ends when [`Broker::shutdown`] is called.
    pub fn new(config: BrokerConfig) -> Self {
        let broker = Self::build(config, None);
        tokio::spawn(broker.clone().run_ticker());
        broker
    }

    fn build(config: BrokerConfig, journal: Option<Arc<Journal>>) -> Self {
        Self {
            inner: Arc::new(Inner {
                queues: DashMap::new(),
                catalog: Mutex::new(QueueCatalog::default()),
                topics: DashMap::new(),
                registry: Mutex::new(Routing::default()),
                shutdown: CancellationToken::new(),
                next_subscription: AtomicU64::new(1),
                observer: OnceLock::new(),
                journal,
                recovery: OnceLock::new(),
                stats: Default::default(),
                memory: MemoryBudget::new(config.limits.max_memory_bytes),
                config,
            }),
        }
    }

    /// A broker whose state survives restarts: recovers it from the write-ahead log in
    /// `storage` (see [`crate::broker::store`]), writes a snapshot of it so the old log
    /// files can go, and logs every later change. Leased jobs are visible again. Must be
    /// called inside a Tokio runtime; blocks while it reads the log.
    pub fn open(
        config: BrokerConfig,
        storage: Arc<dyn Storage>,
        store: StoreConfig,
    ) -> Result<(Self, RecoveryReport), RecoveryError> {
        let recovered = recover(&*storage, store.repair, now_ms())?;
        let first = recovered.next_segment;
        let journal = Arc::new(Journal::start(storage, &store, &recovered));
        let broker = Self::build(config, Some(journal.clone()));
        let _ = broker.inner.recovery.set(recovered.report.clone());
        broker.install_state(recovered.queues, recovered.topics);
        // The recovered state becomes the base of the new log, so every older file (and
        // any torn tail) is gone after this and recovery time stays proportional to the
        // live data. A disk that cannot take it (full, failing) still serves what it
        // holds: the broker starts fail-stopped, read-only.
        let unwritable = recovered.write_failure.or_else(|| {
            let (queues, topics) = broker.capture();
            journal
                .write_snapshot(first, 0, queues, topics, now_ms())
                .err()
        });
        match unwritable {
            Some(reason) => journal.fail_stop(StoreError::UnwritableAtStartup(Box::new(reason))),
            None => {
                tokio::spawn(broker.clone().run_failure_watch(journal.clone()));
            }
        }
        tokio::spawn(broker.clone().run_ticker());
        tokio::spawn(broker.clone().run_compactor(journal));
        Ok((broker, recovered.report))
    }

    /// Puts recovered (or reloaded) queues and topics in place of the current ones: a
    /// queue or topic that is not among them goes, as if deleted.
    fn install_state(&self, queues: Vec<Queue>, topics: Vec<Topic>) {
        let mut queues: HashMap<String, Queue> = queues
            .into_iter()
            .map(|q| (q.name().to_owned(), q))
            .collect();
        let current: Vec<Arc<str>> = self.inner.queues.iter().map(|e| e.key().clone()).collect();
        for name in current {
            let Some(slot) = self.inner.queues.get(&name).map(|e| e.value().clone()) else {
                continue;
            };
            match queues.remove(&*name) {
                Some(queue) => *lock(&slot.queue) = queue,
                None => {
                    self.inner.queues.remove(&name);
                    slot.deleted.store(true, Ordering::Release);
                    if let Some(observer) = self.inner.observer.get() {
                        observer.queue_deleted(&name);
                    }
                }
            }
            // Waiters re-read the queue (or see it deleted).
            slot.ready.notify_waiters();
        }
        for queue in queues.into_values() {
            let name: Arc<str> = Arc::from(queue.name());
            self.inner.queues.insert(
                name.clone(),
                Arc::new(SharedQueue {
                    name,
                    queue: Mutex::new(queue),
                    ready: Notify::new(),
                    deleted: AtomicBool::new(false),
                }),
            );
        }
        {
            let registry = lock(&self.inner.registry);
            let mut topics: HashMap<Arc<str>, Topic> =
                topics.into_iter().map(|t| (t.name().clone(), t)).collect();
            let current: Vec<Arc<str>> =
                self.inner.topics.iter().map(|e| e.key().clone()).collect();
            for name in current {
                let Some(slot) = self.inner.topics.get(&name).map(|e| e.value().clone()) else {
                    continue;
                };
                match topics.remove(&name) {
                    Some(topic) => {
                        let mut held = lock(&slot.topic);
                        slot.durable_seq.store(topic.next_seq(), Ordering::Release);
                        *held = topic;
                    }
                    None => {
                        self.inner.topics.remove(&name);
                        slot.deleted.store(true, Ordering::Release);
                        if let Some(observer) = self.inner.observer.get() {
                            observer.topic_deleted(&name);
                        }
                    }
                }
                slot.wake_subscribers();
            }
            for topic in topics.into_values() {
                let name = topic.name().clone();
                let slot = Arc::new(SharedTopic {
                    name: name.clone(),
                    durable_seq: AtomicU64::new(topic.next_seq()),
                    topic: Mutex::new(topic),
                    subscribers: Mutex::new(Vec::new()),
                    deleted: AtomicBool::new(false),
                    gaps: AtomicU64::new(0),
                });
                let matching: Vec<Arc<SubscriberShared>> = registry
                    .subscriptions
                    .iter()
                    .filter(|s| s.pattern.matches(&name))
                    .cloned()
                    .collect();
                for sub in &matching {
                    lock(&sub.new_topics).push(slot.clone());
                    sub.wake();
                }
                *lock(&slot.subscribers) = matching;
                self.inner.topics.insert(name, slot);
            }
        }
        {
            // Recovered state was within the limits when it was written; it is kept whole
            // even if `--max-queues` is lower now.
            let mut catalog = lock(&self.inner.catalog);
            *catalog = QueueCatalog::default();
            for entry in self.inner.queues.iter() {
                let dlq = lock(&entry.value().queue)
                    .policy()
                    .dead_letter_queue
                    .clone();
                self.add_dead_letter_ref(&mut catalog, &dlq);
            }
        }
        // Nothing changes while state is installed (startup, or under the exclusive gate),
        // so the sum is exact.
        let held: u64 = self
            .inner
            .queues
            .iter()
            .map(|e| lock(&e.value().queue).payload_bytes())
            .chain(
                self.inner
                    .topics
                    .iter()
                    .map(|e| lock(&e.value().topic).retained().1),
            )
            .sum();
        self.inner.memory.reset(held);
        self.rebuild_bindings();
    }

    /// Waits for the log to fail, then shows only what is durable: the state is reloaded
    /// from disk and swapped in before the refused requests get their answer, so nothing
    /// refused is ever visible after the refusal (see [`Journal::settle`]).
    async fn run_failure_watch(self, journal: Arc<Journal>) {
        tokio::select! {
            _ = self.inner.shutdown.cancelled() => {
                // Stopping: nobody is left to show anything to.
                journal.settle();
                return;
            }
            _ = journal.failed() => {}
        }
        let broker = self.clone();
        let reloading = journal.clone();
        let outcome =
            tokio::task::spawn_blocking(move || broker.revert_to_durable(&reloading)).await;
        match outcome {
            Ok(Ok(())) => tracing::warn!(
                "after the storage failure the broker shows the state that is durable on disk (read-only)"
            ),
            Ok(Err(e)) => tracing::error!(
                error = %e,
                "after the storage failure the durable state could not be reloaded; changes that were refused may still show until a restart"
            ),
            Err(e) => tracing::error!(error = %e, "reloading the durable state panicked"),
        }
        journal.settle();
    }

    /// Blocking: replaces the live state with what is durable on disk.
    fn revert_to_durable(&self, journal: &Journal) -> Result<(), RecoveryError> {
        // No compaction deletes files while they are read, and no change is half-made.
        let Some(_slot) = journal.compaction_slot() else {
            return Ok(());
        };
        let _exclusive = journal.exclusive();
        let durable = journal.reload(now_ms())?;
        self.install_state(durable.queues, durable.topics);
        Ok(())
    }

    /// Why the write-ahead log failed (fail-stop), if it did; always `None` with memory
    /// storage.
    pub fn storage_failure(&self) -> Option<String> {
        self.inner
            .journal
            .as_ref()
            .and_then(|j| j.failure())
            .map(|e| e.to_string())
    }

    /// Resolves with the reason once the write-ahead log fails; never with memory
    /// storage.
    pub async fn storage_failed(&self) -> String {
        match &self.inner.journal {
            Some(journal) => journal.failed().await.to_string(),
            None => std::future::pending().await,
        }
    }

    /// The storage engine and its state.
    pub fn storage_status(&self) -> StorageStatus {
        match &self.inner.journal {
            None => StorageStatus {
                engine: "memory",
                ..StorageStatus::default()
            },
            Some(journal) => StorageStatus {
                engine: "wal",
                fsync: Some(journal.fsync().to_string()),
                failure: journal.failure().map(|e| e.to_string()),
                recovery: self.inner.recovery.get().cloned().unwrap_or_default(),
            },
        }
    }

    /// Stops the write-ahead log after everything appended is written and synced (with
    /// `--fsync interval:<ms>` this is what makes a clean shutdown lose nothing).
    pub fn close_storage(&self) {
        if let Some(journal) = &self.inner.journal {
            journal.close();
        }
    }

    // ---- durability hooks -------------------------------------------------------------

    /// A batch that records changes when the broker has a log.
    fn batch(&self) -> Batch {
        if self.inner.journal.is_some() {
            Batch::enabled()
        } else {
            Batch::disabled()
        }
    }

    /// Waits while the log's buffer is full, and refuses changes after a storage failure.
    pub(crate) async fn wait_for_log_space(&self) -> Result<(), BrokerError> {
        match &self.inner.journal {
            Some(journal) => journal.wait_for_log_space().await,
            None => Ok(()),
        }
    }

    /// Starts a change: held (in sync code only) until its records are appended, so a
    /// snapshot never sees half of it.
    pub(crate) fn begin(&self) -> Result<Option<RwLockReadGuard<'_, ()>>, BrokerError> {
        self.inner.journal.as_ref().map(|j| j.begin()).transpose()
    }

    /// Appends a batch; call while holding the lock of what it changed.
    fn commit(&self, batch: Batch, at: Millis) -> Result<Commit, BrokerError> {
        match &self.inner.journal {
            Some(journal) => journal.append(batch, at),
            None => Ok(Commit::NONE),
        }
    }

    /// Waits until a commit is durable; call after releasing every lock.
    pub(crate) async fn durable(&self, commit: Commit) -> Result<(), BrokerError> {
        match &self.inner.journal {
            Some(journal) => journal.durable(commit).await,
            None => Ok(()),
        }
    }

    async fn run_compactor(self, journal: Arc<Journal>) {
        loop {
            tokio::select! {
                _ = self.inner.shutdown.cancelled() => return,
                _ = journal.compaction_due() => {}
            }
            if !journal.compaction_still_due() {
                continue;
            }
            let broker = self.clone();
            match tokio::task::spawn_blocking(move || broker.compact()).await {
                Ok(Ok(bytes)) => {
                    tracing::info!(snapshot_bytes = bytes, "write-ahead log compacted")
                }
                // The log itself is intact (nothing was deleted), so this is not fail-stop;
                // the next segment roll tries again.
                Ok(Err(e)) => tracing::error!(error = %e, "write-ahead log compaction failed"),
                Err(e) => tracing::error!(error = %e, "write-ahead log compaction panicked"),
            }
        }
    }

    /// Snapshots the state at a fresh segment boundary and deletes the files before it.
    /// Blocking; returns the snapshot's size.
    fn compact(&self) -> Result<u64, BrokerError> {
        let journal = self
            .inner
            .journal
            .as_ref()
            .expect("only a broker with a log compacts");
        let Some(_slot) = journal.compaction_slot() else {
            return Ok(0);
        };
        let (base, last, queues, topics) = {
            let _exclusive = journal.exclusive();
            let (base, last) = journal.roll();
            let (queues, topics) = self.capture();
            (base, last, queues, topics)
        };
        Ok(journal.write_snapshot(base, last, queues, topics, now_ms())?)
    }

    /// Copies the persistent state of every queue and topic (payloads are shared, not
    /// copied). Under the exclusive gate this is exactly the state the log describes.
    fn capture(&self) -> (Vec<SnapshotQueue>, Vec<SnapshotTopic>) {
        let queues = self
            .inner
            .queues
            .iter()
            .map(|entry| {
                let q = lock(&entry.value().queue);
                let mut history = q.history(usize::MAX);
                history.reverse();
                SnapshotQueue {
                    name: entry.key().to_string(),
                    policy: q.policy().clone(),
                    paused: q.is_paused(),
                    live: q.list(None, 0, usize::MAX).0,
                    history,
                    dedup: q.dedup_entries(),
                }
            })
            .collect();
        let topics = self
            .inner
            .topics
            .iter()
            .map(|entry| {
                let t = lock(&entry.value().topic);
                SnapshotTopic {
                    name: entry.key().to_string(),
                    retention: t.retention(),
                    next_seq: t.next_seq(),
                    messages: t.read(t.first_seq(), usize::MAX).slices,
                    dedup: t.dedup_entries(),
                }
            })
            .collect();
        (queues, topics)
    }

    /// The limits this broker enforces.
    pub fn limits(&self) -> &Limits {
        &self.inner.config.limits
    }

    /// Locks a queue to change it: what it then holds in payloads goes to the memory
    /// budget when the lock is released.
    pub(crate) fn lock_queue<'a>(&'a self, slot: &'a SharedQueue) -> Accounted<'a, Queue> {
        Accounted::new(lock(&slot.queue), &self.inner.memory)
    }

    /// [`Broker::lock_queue`] for a topic.
    fn lock_topic<'a>(&'a self, slot: &'a SharedTopic) -> Accounted<'a, Topic> {
        Accounted::new(lock(&slot.topic), &self.inner.memory)
    }

    /// The token cancelled on shutdown.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.inner.shutdown.clone()
    }

    /// Starts shutting down: long polls return, subscriptions and the expiry task end.
    pub fn shutdown(&self) {
        self.inner.shutdown.cancel();
    }

    /// Installs the [`Observer`] made by `make` unless one is installed already; returns
    /// the installed one. A broker has at most one observer for its whole life, so the
    /// hot paths read it with a single atomic load.
    pub fn install_observer(&self, make: impl FnOnce() -> Arc<dyn Observer>) -> Arc<dyn Observer> {
        self.inner.observer.get_or_init(make).clone()
    }

    async fn run_ticker(self) {
        let mut interval = tokio::time::interval(self.inner.config.tick_interval);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = self.inner.shutdown.cancelled() => return,
                _ = interval.tick() => {}
            }
            let now = now_ms();
            let queues: Vec<Arc<SharedQueue>> = self
                .inner
                .queues
                .iter()
                .map(|e| e.value().clone())
                .collect();
            for slot in queues {
                let due = lock(&slot.queue).next_due().is_some_and(|t| t <= now);
                if due {
                    // After a storage failure nothing changes any more (fail-stop).
                    let Ok(_change) = self.begin() else { break };
                    let _ = self.with_queue(&slot, |q, _| q.tick(now));
                }
            }
            let topics: Vec<Arc<SharedTopic>> = self
                .inner
                .topics
                .iter()
                .map(|e| e.value().clone())
                .collect();
            for slot in topics {
                self.lock_topic(&slot).enforce_retention(now);
            }
        }
    }

    // ---- queues: lookup and mutation helpers ------------------------------------------

    fn existing_queue(&self, field: &str, name: &str) -> Result<Arc<SharedQueue>, BrokerError> {
        validate_name(field, name)?;
        self.inner
            .queues
            .get(name)
            .map(|e| e.value().clone())
            .ok_or_else(|| BrokerError::NotFound(format!("queue {name:?} does not exist")))
    }

    /// The queue, created with the default policy on first use.
    pub(crate) fn queue_or_create(
        &self,
        field: &str,
        name: &str,
    ) -> Result<Arc<SharedQueue>, BrokerError> {
        validate_name(field, name)?;
        if let Some(slot) = self.inner.queues.get(name) {
            return Ok(slot.value().clone());
        }
        self.create_queue_slot(
            field,
            name,
            QueuePolicy::default_for(name),
            Creation::Counted,
        )
    }

    /// Takes a slot for the dead-letter queue `dlq` a policy names (none for `""`).
    fn add_dead_letter_ref(&self, catalog: &mut QueueCatalog, dlq: &str) {
        if dlq.is_empty() {
            return;
        }
        match catalog.dead_letter_refs.get_mut(dlq) {
            Some(n) => *n += 1,
            None => {
                catalog.dead_letter_refs.insert(Arc::from(dlq), 1);
                if !self.inner.queues.contains_key(dlq) {
                    catalog.reserved += 1;
                }
            }
        }
    }

    /// Gives back what [`Broker::add_dead_letter_ref`] took.
    fn drop_dead_letter_ref(&self, catalog: &mut QueueCatalog, dlq: &str) {
        let Some(n) = catalog.dead_letter_refs.get_mut(dlq) else {
            return;
        };
        *n -= 1;
        if *n == 0 {
            catalog.dead_letter_refs.remove(dlq);
            if !self.inner.queues.contains_key(dlq) {
                catalog.reserved -= 1;
            }
        }
    }

    /// How many more slots naming `dlq` as a dead-letter queue takes (0 or 1); `own` is a
    /// queue being created in the same step.
    fn dead_letter_slot(&self, catalog: &QueueCatalog, dlq: &str, own: &str) -> usize {
        usize::from(
            !dlq.is_empty()
                && dlq != own
                && !self.inner.queues.contains_key(dlq)
                && !catalog.dead_letter_refs.contains_key(dlq),
        )
    }

    /// The error for a queue count past `--max-queues`.
    fn too_many_queues(&self, field: &str, what: String, in_use: usize) -> BrokerError {
        let max = self.inner.config.limits.max_queues;
        BrokerError::ResourceExhausted(format!(
            "{field}: cannot create {what}: the broker holds the maximum of {max} queues ({in_use} in use, dead-letter queues named by policies included)"
        ))
    }

    /// Creates the queue `name` with `policy` unless it exists (then returns that one). The
    /// queue and the dead-letter queue its policy names both count against `--max-queues`
    /// (see [`QueueCatalog`]), and both must be valid names.
    fn create_queue_slot(
        &self,
        field: &str,
        name: &str,
        mut policy: QueuePolicy,
        how: Creation,
    ) -> Result<Arc<SharedQueue>, BrokerError> {
        let dlq = policy.dead_letter_queue.clone();
        if how == Creation::Counted && !dlq.is_empty() {
            validate_name("dead_letter_queue", &dlq).map_err(|e| {
                BrokerError::invalid(
                    field,
                    format!(
                        "queue {name:?} would dead-letter into {dlq:?}, which is not a valid queue name ({e}); use a shorter name or set policy.dead_letter_queue"
                    ),
                )
            })?;
        }
        let mut catalog = lock(&self.inner.catalog);
        if let Some(slot) = self.inner.queues.get(name) {
            return Ok(slot.value().clone());
        }
        let in_use = self.inner.queues.len() + catalog.reserved;
        let own = usize::from(!catalog.dead_letter_refs.contains_key(name));
        let extra = self.dead_letter_slot(&catalog, &dlq, name);
        if in_use + own + extra > self.inner.config.limits.max_queues {
            match how {
                Creation::Counted => {
                    let what = if extra > 0 {
                        format!("queue {name:?} with its dead-letter queue {dlq:?}")
                    } else {
                        format!("queue {name:?}")
                    };
                    return Err(self.too_many_queues(field, what, in_use));
                }
                Creation::DeadLetters => {
                    // Its own slot was taken when a policy named it; a dead-letter queue
                    // of its own does not fit, so its dead jobs stay in it as dead records.
                    tracing::warn!(
                        queue = name,
                        dead_letter_queue = %dlq,
                        "dead-letter queue created without a dead-letter queue of its own: --max-queues is reached"
                    );
                    policy.dead_letter_queue.clear();
                }
            }
        }
        let slot = Arc::new(SharedQueue {
            name: Arc::from(name),
            queue: Mutex::new(Queue::new(name, policy.clone())),
            ready: Notify::new(),
            deleted: AtomicBool::new(false),
        });
        self.inner.queues.insert(slot.name.clone(), slot.clone());
        if catalog.dead_letter_refs.contains_key(name) {
            catalog.reserved -= 1;
        }
        self.add_dead_letter_ref(&mut catalog, &policy.dead_letter_queue);
        Ok(slot)
    }

    /// Runs `f` on the locked queue, logs what it recorded in the batch plus any lease
    /// expiries and dead letters (still under the lock, so log order is state order), then
    /// wakes long-pollers if jobs are visible and moves dead letters to their queues
    /// (after the lock is released). Call inside [`Broker::begin`]. The commit is an
    /// error only if the log failed, after `f` ran.
    pub(crate) fn with_queue<R>(
        &self,
        slot: &SharedQueue,
        f: impl FnOnce(&mut Queue, &mut Batch) -> R,
    ) -> Result<(R, Commit), BrokerError> {
        let mut batch = self.batch();
        let (result, letters, visible, commit) = {
            let mut q = self.lock_queue(slot);
            let result = f(&mut q, &mut batch);
            let expired = q.take_expired();
            let letters = q.take_dead_letters();
            for seq in expired {
                batch.job_state_of(&slot.name, &q, seq);
            }
            for letter in &letters {
                batch.dead_letter(letter);
            }
            let commit = self.commit(batch, now_ms());
            (result, letters, q.has_visible(), commit)
        };
        if visible {
            slot.wake_one();
        }
        if !letters.is_empty() {
            self.route_dead_letters(letters);
        }
        Ok((result, commit?))
    }

    fn route_dead_letters(&self, letters: Vec<DeadLetter>) {
        let now = now_ms();
        for letter in letters {
            let target = self
                .create_queue_slot(
                    "dead_letter_queue",
                    &letter.target,
                    QueuePolicy::default_for(&letter.target),
                    Creation::DeadLetters,
                )
                .expect("a dead-letter queue is never refused");
            self.lock_queue(&target).insert_dead_letter(now, letter);
            target.wake_one();
        }
    }

    // ---- producing ------------------------------------------------------------------

    /// Validates and stores jobs in one queue, all or none; answers once they are durable.
    pub async fn enqueue(
        &self,
        queue: &str,
        jobs: Vec<NewJob>,
    ) -> Result<Vec<Enqueued>, BrokerError> {
        let logged = self.enqueue_logged(queue, jobs).await?;
        self.confirm(logged).await
    }

    /// [`Broker::enqueue`] up to the log append: the jobs are stored (visible to workers)
    /// and their records appended, but not yet durable. A pipelined stream answers
    /// requests in order through [`Broker::confirm`], so their fsyncs overlap.
    pub async fn enqueue_logged(
        &self,
        queue: &str,
        jobs: Vec<NewJob>,
    ) -> Result<Logged<Vec<Enqueued>>, BrokerError> {
        let limits = &self.inner.config.limits;
        validate_name("queue", queue)?;
        limits.check_batch("jobs", jobs.len())?;
        for (i, job) in jobs.iter().enumerate() {
            limits.check_entry(
                |name| format!("jobs[{i}].{name}"),
                job.payload.len(),
                &job.headers,
                &[
                    ("kind", Some(job.kind.as_str())),
                    ("idempotency_key", job.idempotency_key.as_deref()),
                    ("ordering_key", job.ordering_key.as_deref()),
                ],
            )?;
        }
        if self.inner.memory.is_limited() {
            let bytes = jobs.iter().map(|j| j.payload.len() as u64).sum();
            self.inner.memory.check("jobs", bytes)?;
        }
        self.wait_for_log_space().await?;
        let (results, commit) = {
            let _change = self.begin()?;
            let slot = self.queue_or_create("queue", queue)?;
            let now = now_ms();
            self.with_queue(&slot, |q, batch| {
                let out = q.enqueue(now, jobs)?;
                if batch.is_enabled() {
                    for e in out.iter().filter(|e| !e.duplicate) {
                        if let Some(job) = q.get(&e.id) {
                            batch.new_job(&slot.name, &job);
                        }
                    }
                }
                Ok::<_, BrokerError>(out)
            })?
        };
        Ok(Logged {
            value: results?,
            commit,
        })
    }

    /// Waits until a logged change is durable, then hands back its result.
    pub async fn confirm<T>(&self, logged: Logged<T>) -> Result<T, BrokerError> {
        self.durable(logged.commit).await?;
        Ok(logged.value)
    }

    /// Validates and appends messages to one topic, and enqueues them into every queue
    /// bound to a matching pattern, atomically: if a bound queue is full nothing is written.
    /// Answers once the messages (and the bound queues' jobs) are durable.
    pub async fn publish(
        &self,
        topic: &str,
        messages: Vec<NewMessage>,
    ) -> Result<Vec<Appended>, BrokerError> {
        let logged = self.publish_logged(topic, messages).await?;
        self.confirm(logged).await
    }

    /// [`Broker::publish`] up to the log append: the messages are appended (and delivered
    /// to live subscribers) but not yet durable; see [`Broker::enqueue_logged`].
    pub async fn publish_logged(
        &self,
        topic: &str,
        messages: Vec<NewMessage>,
    ) -> Result<Logged<Vec<Appended>>, BrokerError> {
        let limits = &self.inner.config.limits;
        validate_name("topic", topic)?;
        limits.check_batch("messages", messages.len())?;
        for (i, m) in messages.iter().enumerate() {
            limits.check_entry(
                |name| format!("messages[{i}].{name}"),
                m.payload.len(),
                &m.headers,
                &[
                    ("key", Some(m.key.as_str())),
                    ("idempotency_key", m.idempotency_key.as_deref()),
                ],
            )?;
        }
        self.wait_for_log_space().await?;
        let (value, commit) = self.publish_locked(topic, messages)?;
        Ok(Logged { value, commit })
    }

    /// The locked part of [`Broker::publish`]: appends, fans out to bound queues, logs.
    fn publish_locked(
        &self,
        topic: &str,
        messages: Vec<NewMessage>,
    ) -> Result<(Vec<Appended>, Commit), BrokerError> {
        let change = self.begin()?;
        let targets = self.bound_queues(topic);
        if self.inner.memory.is_limited() {
            // Each bound queue keeps its own copy (a job), so each copy counts.
            let bytes: u64 = messages.iter().map(|m| m.payload.len() as u64).sum();
            let copies = 1 + targets.len() as u64;
            self.inner
                .memory
                .check("messages", bytes.saturating_mul(copies))?;
        }
        let slot = self.topic_or_create("topic", topic, None)?;
        let now = now_ms();
        let mut batch = self.batch();
        let keys: Vec<Option<String>> = if batch.is_enabled() {
            messages.iter().map(|m| m.idempotency_key.clone()).collect()
        } else {
            Vec::new()
        };

        let mut topic_guard = self.lock_topic(&slot);
        let mut queue_guards: Vec<Accounted<'_, Queue>> =
            targets.iter().map(|q| self.lock_queue(q)).collect();
        if !queue_guards.is_empty() {
            let fresh =
                topic_guard.count_new(now, messages.iter().map(|m| m.idempotency_key.clone()));
            for q in &queue_guards {
                q.check_capacity(fresh).map_err(|e| {
                    BrokerError::ResourceExhausted(format!(
                        "nothing published to {topic:?}: bound {e}"
                    ))
                })?;
            }
        }
        let (results, stored) = topic_guard.append(now, messages);
        if let Some(block) = &stored {
            if batch.is_enabled() {
                let stored_keys = keys
                    .into_iter()
                    .zip(&results)
                    .filter(|(_, r)| !r.duplicate)
                    .map(|(k, _)| k)
                    .collect();
                batch.published(topic, block, stored_keys);
            }
            for q in queue_guards.iter_mut() {
                let jobs = block
                    .messages()
                    .map(|m| {
                        let mut headers = m.entry.headers().cloned().unwrap_or_default();
                        headers.insert(HEADER_TOPIC_SEQUENCE.into(), m.sequence.to_string());
                        NewJob {
                            payload: m.entry.payload.clone(),
                            headers,
                            kind: topic.to_owned(),
                            ..NewJob::default()
                        }
                    })
                    .collect();
                let out = q
                    .enqueue(now, jobs)
                    .expect("capacity was checked under the same lock");
                if batch.is_enabled() {
                    for e in out.iter().filter(|e| !e.duplicate) {
                        if let Some(job) = q.get(&e.id) {
                            batch.new_job(q.name(), &job);
                        }
                    }
                }
            }
        }
        // The topic lock is held until the record is appended, so publishes to one topic
        // are logged in sequence order. Subscribers are told of the new messages once
        // they are durable: by the log's writer (one registration per publish, which
        // holds even if this request is cancelled), or here without a log.
        let end = stored.as_ref().map(|block| block.end_sequence());
        let commit = match (&self.inner.journal, end) {
            (Some(journal), Some(end)) => {
                let listener: Arc<dyn DurableListener> = slot.clone();
                journal.append_with(batch, now, Some((listener, end)))
            }
            _ => self.commit(batch, now),
        };
        drop(topic_guard);
        drop(queue_guards);
        drop(change);
        for q in &targets {
            q.wake_one();
        }
        if self.inner.journal.is_none()
            && let Some(end) = end
        {
            slot.advance_durable(end);
        }
        Ok((results, commit?))
    }

    /// Queues bound to patterns that match `topic`, sorted by name (the lock order).
    fn bound_queues(&self, topic: &str) -> Vec<Arc<SharedQueue>> {
        let names: Vec<Arc<str>> = {
            let registry = lock(&self.inner.registry);
            let mut names: Vec<Arc<str>> = registry
                .bindings
                .iter()
                .filter(|(p, _)| p.matches(topic))
                .map(|(_, q)| q.clone())
                .collect();
            names.sort();
            names.dedup();
            names
        };
        names
            .iter()
            .filter_map(|n| self.inner.queues.get(n).map(|e| e.value().clone()))
            .collect()
    }

    fn rebuild_bindings(&self) {
        let mut bindings = Vec::new();
        for entry in self.inner.queues.iter() {
            let q = lock(&entry.value().queue);
            for pattern in &q.policy().topic_bindings {
                if let Ok(p) = Pattern::parse("topic_bindings", pattern) {
                    bindings.push((p, entry.key().clone()));
                }
            }
        }
        lock(&self.inner.registry).bindings = bindings;
    }

    // ---- consuming ------------------------------------------------------------------

    /// Leases jobs, long-polling up to `wait_ms` when none is visible.
    pub async fn lease(
        &self,
        queue: &str,
        params: LeaseParams,
    ) -> Result<Vec<Delivery>, BrokerError> {
        let limits = &self.inner.config.limits;
        if params.max_jobs > limits.max_batch {
            return Err(BrokerError::over_limit(
                "max_jobs",
                params.max_jobs as u64,
                limits.max_batch as u64,
                "jobs",
            ));
        }
        if let Some(v) = params.visibility_timeout_ms {
            check_duration_ms("visibility_timeout_ms", v, MAX_VISIBILITY_MS)?;
        }
        check_duration_ms("wait_ms", params.wait_ms, MAX_LEASE_WAIT_MS)?;
        let slot = self.queue_or_create("queue", queue)?;
        let consumer: Arc<str> = Arc::from(if params.consumer.is_empty() {
            params.address.as_str()
        } else {
            params.consumer.as_str()
        });
        let max = params.max_jobs.max(1);
        let give_up = tokio::time::Instant::now() + Duration::from_millis(params.wait_ms);
        loop {
            let notified = slot.ready.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let now = now_ms();
            // Leases are not logged, but the expiries a lease runs first are.
            let ((jobs, next_due), _) = {
                let _change = self.begin()?;
                self.with_queue(&slot, |q, _| {
                    let visibility = params
                        .visibility_timeout_ms
                        .unwrap_or(q.policy().visibility_timeout_ms);
                    (
                        q.lease(now, max, visibility, &consumer, &params.address),
                        q.next_due(),
                    )
                })?
            };
            if !jobs.is_empty()
                || tokio::time::Instant::now() >= give_up
                || slot.deleted.load(Ordering::Acquire)
            {
                return Ok(jobs);
            }
            // Sleep until a job may be visible: a notification, the next due timer, or
            // the end of the wait.
            let mut wake_at = give_up;
            if let Some(due) = next_due {
                let in_ms = due.saturating_sub(now_ms());
                // Past what the clock can hold (a retry saturated at the end of time), the
                // end of the wait comes first anyway.
                if let Some(at) =
                    tokio::time::Instant::now().checked_add(Duration::from_millis(in_ms))
                {
                    wake_at = wake_at.min(at);
                }
            }
            tokio::select! {
                _ = &mut notified => {}
                _ = tokio::time::sleep_until(wake_at) => {}
                _ = self.inner.shutdown.cancelled() => return Ok(Vec::new()),
            }
        }
    }

    /// Checks a lease duration: 1 ms to 12 h.
    pub(crate) fn check_visibility(field: &str, ms: u64) -> Result<(), BrokerError> {
        if ms == 0 {
            return Err(BrokerError::invalid(field, "must be at least 1 ms"));
        }
        check_duration_ms(field, ms, MAX_VISIBILITY_MS)
    }

    /// Checks a nack's error text and explicit retry delay; `prefix` is the request path
    /// of the nack (empty for the unary call, `nacks.` on a consume stream).
    pub(crate) fn check_nack(
        &self,
        prefix: &str,
        error: &str,
        retry_delay_ms: Option<u64>,
    ) -> Result<(), BrokerError> {
        self.inner
            .config
            .limits
            .check_error_text(&format!("{prefix}error"), error)?;
        if let Some(d) = retry_delay_ms {
            check_duration_ms(&format!("{prefix}retry_delay_ms"), d, MAX_RETRY_DELAY_MS)?;
        }
        Ok(())
    }

    pub(crate) fn parse_lease(field: &str, lease_id: &str) -> Result<LeaseId, BrokerError> {
        lease_id
            .parse()
            .map_err(|why| Self::bad_lease_id(field, lease_id, why))
    }

    /// The error for a malformed lease id in `field`.
    pub(crate) fn bad_lease_id(field: &str, lease_id: &str, why: LeaseIdError) -> BrokerError {
        BrokerError::invalid(
            field,
            format!(
                "{lease_id:?} is not a lease id: {why} (expected <queue>/<seq>/<nonce> as returned by Lease)"
            ),
        )
    }

    fn lease_queue(&self, lease: &LeaseId) -> Result<Arc<SharedQueue>, BrokerError> {
        self.inner
            .queues
            .get(&*lease.queue)
            .map(|e| e.value().clone())
            .ok_or_else(|| {
                BrokerError::FailedPrecondition(format!(
                    "lease {lease} is stale: queue {:?} no longer exists",
                    lease.queue
                ))
            })
    }

    /// Acks deliveries, all or none: if any lease is stale nothing is applied. Answers
    /// once the acks are durable.
    pub async fn ack(&self, acks: Vec<(String, Option<Bytes>)>) -> Result<(), BrokerError> {
        let limits = &self.inner.config.limits;
        limits.check_batch("acks", acks.len())?;
        let mut parsed = Vec::with_capacity(acks.len());
        for (i, (lease_id, result)) in acks.into_iter().enumerate() {
            // Field names are formatted only for an error: this loop runs per ack.
            let lease = lease_id.parse::<LeaseId>().map_err(|why| {
                Self::bad_lease_id(&format!("acks[{i}].lease_id"), &lease_id, why)
            })?;
            if let Some(r) = &result {
                limits.check_payload(&format!("acks[{i}].result"), r.len())?;
            }
            parsed.push((lease, result));
        }
        let mut by_queue: HashMap<Arc<str>, Vec<usize>> = HashMap::new();
        for (i, (lease, _)) in parsed.iter().enumerate() {
            by_queue.entry(lease.queue.clone()).or_default().push(i);
        }
        let mut names: Vec<Arc<str>> = by_queue.keys().cloned().collect();
        names.sort_unstable();
        self.wait_for_log_space().await?;
        let change = self.begin()?;
        let mut slots = Vec::with_capacity(names.len());
        for name in &names {
            let first = by_queue[name][0];
            slots.push(self.lease_queue(&parsed[first].0)?);
        }
        let now = now_ms();
        // Lease-to-ack times, collected only when something measures them.
        let observer = self.inner.observer.get();
        let mut acked: Vec<(usize, u64)> = Vec::new();
        let commit = {
            let mut guards: Vec<Accounted<'_, Queue>> =
                slots.iter().map(|s| self.lock_queue(s)).collect();
            let mut stale = Vec::new();
            for (guard, name) in guards.iter().zip(&names) {
                for &i in &by_queue[name] {
                    if let Err(e) = guard.check_lease(now, &parsed[i].0) {
                        stale.push(e.to_string());
                    }
                }
            }
            if !stale.is_empty() {
                let shown: Vec<&str> = stale.iter().take(10).map(String::as_str).collect();
                return Err(BrokerError::FailedPrecondition(format!(
                    "{} of {} leases are stale, nothing was acked: {}",
                    stale.len(),
                    parsed.len(),
                    shown.join("; ")
                )));
            }
            let mut batch = self.batch();
            for (q, (guard, name)) in guards.iter_mut().zip(&names).enumerate() {
                for &i in &by_queue[name] {
                    let (lease, result) = &mut parsed[i];
                    let held = guard
                        .ack(now, lease, result.take())
                        .expect("lease was checked under the same lock");
                    if observer.is_some() {
                        acked.extend(held.map(|ms| (q, ms)));
                    }
                    batch.job_state_of(name, guard, lease.seq);
                }
            }
            self.commit(batch, now)
        };
        drop(change);
        // Reported after the locks are released: the observer may take its own.
        if let Some(observer) = observer {
            for (q, ms) in acked {
                observer.job_acked(&names[q], Duration::from_millis(ms));
            }
        }
        for slot in &slots {
            if lock(&slot.queue).has_visible() {
                slot.wake_one();
            }
        }
        self.durable(commit?).await
    }

    /// Fails a delivery (retry or dead-letter); answers once that is durable.
    pub async fn nack(
        &self,
        lease_id: &str,
        error: String,
        retry_delay_ms: Option<u64>,
        dead_letter: bool,
    ) -> Result<(JobState, Option<Millis>), BrokerError> {
        let lease = Self::parse_lease("lease_id", lease_id)?;
        self.check_nack("", &error, retry_delay_ms)?;
        self.wait_for_log_space().await?;
        let now = now_ms();
        let (outcome, commit) = {
            let _change = self.begin()?;
            let slot = self.lease_queue(&lease)?;
            self.with_queue(&slot, |q, batch| {
                let outcome = q.nack(now, &lease, error, retry_delay_ms, dead_letter)?;
                batch.job_state_of(&slot.name, q, lease.seq);
                Ok::<_, BrokerError>(outcome)
            })?
        };
        let outcome = outcome?;
        self.durable(commit).await?;
        Ok(match outcome {
            FailOutcome::Dead => (JobState::Dead, None),
            FailOutcome::Retry { at } if at <= now => (JobState::Pending, Some(at)),
            FailOutcome::Retry { at } => (JobState::Retrying, Some(at)),
        })
    }

    /// Extends a live lease; returns the new deadline.
    pub fn extend_lease(
        &self,
        lease_id: &str,
        visibility_timeout_ms: u64,
    ) -> Result<Millis, BrokerError> {
        let lease = Self::parse_lease("lease_id", lease_id)?;
        Self::check_visibility("visibility_timeout_ms", visibility_timeout_ms)?;
        let _change = self.begin()?;
        let slot = self.lease_queue(&lease)?;
        let now = now_ms();
        // Not logged: leases do not survive a restart anyway.
        self.with_queue(&slot, |q, _| q.extend(now, &lease, visibility_timeout_ms))?
            .0
    }

    // ---- inspection -------------------------------------------------------------------

    fn parse_job_id(field: &str, id: &str) -> Result<Uuid, BrokerError> {
        Uuid::parse_str(id)
            .map_err(|e| BrokerError::invalid(field, format!("{id:?} is not a job id: {e}")))
    }

    fn queues_to_search(&self, queue: Option<&str>) -> Result<Vec<Arc<SharedQueue>>, BrokerError> {
        Ok(match queue {
            Some(name) => vec![self.existing_queue("queue", name)?],
            None => self
                .inner
                .queues
                .iter()
                .map(|e| e.value().clone())
                .collect(),
        })
    }

    /// Finds a job by id, in one queue or in all; returns its queue and record. A dead
    /// job is reported from its original queue rather than from the dead-letter queue that
    /// holds its copy.
    pub fn get_job(&self, id: &str, queue: Option<&str>) -> Result<(String, Job), BrokerError> {
        let uuid = Self::parse_job_id("id", id)?;
        let mut found: Option<(String, Job)> = None;
        for slot in self.queues_to_search(queue)? {
            if let Some(job) = lock(&slot.queue).get(&uuid) {
                let better = match &found {
                    None => true,
                    Some((_, f)) => job.state == JobState::Dead && f.state != JobState::Dead,
                };
                if better {
                    found = Some((slot.name.to_string(), job));
                }
            }
        }
        found.ok_or_else(|| BrokerError::NotFound(format!("job {id} not found")))
    }

    /// Cancels a job that is not leased; answers once that is durable.
    pub async fn cancel_job(
        &self,
        id: &str,
        queue: Option<&str>,
    ) -> Result<(String, Job), BrokerError> {
        let uuid = Self::parse_job_id("id", id)?;
        self.wait_for_log_space().await?;
        for slot in self.queues_to_search(queue)? {
            let known = lock(&slot.queue)
                .get(&uuid)
                .is_some_and(|j| !j.state.is_finished());
            if known {
                let now = now_ms();
                let (job, commit) = {
                    let _change = self.begin()?;
                    self.with_queue(&slot, |q, batch| {
                        let job = q.cancel(now, &uuid)?;
                        batch.job_state(&slot.name, &job);
                        Ok::<_, BrokerError>(job)
                    })?
                };
                let job = job?;
                self.durable(commit).await?;
                return Ok((slot.name.to_string(), job));
            }
        }
        // Not live anywhere: report the finished record's state, or that it is unknown.
        let (_, job) = self.get_job(id, queue)?;
        Err(BrokerError::FailedPrecondition(format!(
            "job {id} is already {}",
            job.state.as_str()
        )))
    }

    /// A page of a queue's jobs in one state (live ones if `None`).
    pub fn list_jobs(
        &self,
        queue: &str,
        state: Option<JobState>,
        page_size: usize,
        page_token: &str,
    ) -> Result<(Vec<Job>, Option<u64>), BrokerError> {
        let limits = &self.inner.config.limits;
        if page_size > limits.max_batch {
            return Err(BrokerError::over_limit(
                "page_size",
                page_size as u64,
                limits.max_batch as u64,
                "jobs",
            ));
        }
        let after = if page_token.is_empty() {
            0
        } else {
            page_token.parse().map_err(|_| {
                BrokerError::invalid(
                    "page_token",
                    format!("{page_token:?} is not a page token from ListJobs"),
                )
            })?
        };
        let slot = self.existing_queue("queue", queue)?;
        let size = if page_size == 0 { 100 } else { page_size };
        Ok(lock(&slot.queue).list(state, after, size))
    }

    /// The newest finished jobs of a queue.
    pub fn job_history(&self, queue: &str, limit: usize) -> Result<Vec<Job>, BrokerError> {
        let limits = &self.inner.config.limits;
        if limit > limits.max_batch {
            return Err(BrokerError::over_limit(
                "limit",
                limit as u64,
                limits.max_batch as u64,
                "jobs",
            ));
        }
        let slot = self.existing_queue("queue", queue)?;
        Ok(lock(&slot.queue).history(if limit == 0 { 100 } else { limit }))
    }

    // ---- queue administration -----------------------------------------------------------

    fn apply_patch(
        &self,
        name: &str,
        mut policy: QueuePolicy,
        patch: PolicyPatch,
    ) -> Result<QueuePolicy, BrokerError> {
        if let Some(v) = patch.visibility_timeout_ms {
            Self::check_visibility("policy.visibility_timeout_ms", v)?;
            policy.visibility_timeout_ms = v;
        }
        if let Some(v) = patch.max_attempts {
            if v == 0 {
                return Err(BrokerError::invalid(
                    "policy.max_attempts",
                    "must be at least 1",
                ));
            }
            if v > crate::broker::queue::MAX_ATTEMPTS {
                return Err(BrokerError::over_limit(
                    "policy.max_attempts",
                    v.into(),
                    crate::broker::queue::MAX_ATTEMPTS.into(),
                    "",
                ));
            }
            policy.max_attempts = v;
        }
        if let Some(b) = patch.backoff {
            match &b {
                Backoff::Exponential {
                    initial_ms, max_ms, ..
                } => {
                    check_duration_ms(
                        "policy.backoff.initial_ms",
                        *initial_ms,
                        MAX_RETRY_DELAY_MS,
                    )?;
                    check_duration_ms("policy.backoff.max_ms", *max_ms, MAX_RETRY_DELAY_MS)?;
                }
                Backoff::Schedule(delays) => {
                    check_count(
                        "policy.backoff.delays_ms",
                        delays.len() as u64,
                        MAX_BACKOFF_STEPS as u64,
                    )?;
                    for (i, d) in delays.iter().enumerate() {
                        check_duration_ms(
                            &format!("policy.backoff.delays_ms[{i}]"),
                            *d,
                            MAX_RETRY_DELAY_MS,
                        )?;
                    }
                }
            }
            policy.backoff = b;
        }
        if let Some(dlq) = patch.dead_letter_queue {
            validate_name("policy.dead_letter_queue", &dlq)?;
            if dlq == name {
                return Err(BrokerError::invalid(
                    "policy.dead_letter_queue",
                    format!("{dlq:?} is the queue itself"),
                ));
            }
            policy.dead_letter_queue = dlq;
        }
        if let Some(v) = patch.max_depth {
            if v == 0 {
                return Err(BrokerError::invalid(
                    "policy.max_depth",
                    "must be at least 1",
                ));
            }
            check_count("policy.max_depth", v, MAX_QUEUE_DEPTH)?;
            policy.max_depth = v;
        }
        if let Some(v) = patch.dedup_window_ms {
            check_duration_ms("policy.dedup_window_ms", v, MAX_DEDUP_WINDOW_MS)?;
            policy.dedup_window_ms = v;
        }
        if let Some(bindings) = patch.topic_bindings {
            if bindings.len() as u64 > MAX_TOPIC_BINDINGS {
                return Err(BrokerError::over_limit(
                    "policy.topic_bindings",
                    bindings.len() as u64,
                    MAX_TOPIC_BINDINGS,
                    "patterns",
                ));
            }
            for (i, b) in bindings.iter().enumerate() {
                Pattern::parse(&format!("policy.topic_bindings[{i}]"), b)?;
            }
            policy.topic_bindings = bindings;
        }
        if let Some(v) = patch.history_limit {
            if u64::from(v) > MAX_HISTORY_LIMIT {
                return Err(BrokerError::over_limit(
                    "policy.history_limit",
                    v.into(),
                    MAX_HISTORY_LIMIT,
                    "jobs",
                ));
            }
            policy.history_limit = v;
        }
        Ok(policy)
    }

    fn info(slot: &SharedQueue) -> QueueInfo {
        let q = lock(&slot.queue);
        QueueInfo {
            name: slot.name.to_string(),
            policy: q.policy().clone(),
            paused: q.is_paused(),
        }
    }

    /// Sets a queue's policy and logs it, under the queue's lock. A new dead-letter queue
    /// takes its slot now (see [`QueueCatalog`]); past `--max-queues` nothing changes.
    /// The outer error refuses the change; the inner one is the log's.
    fn set_policy(
        &self,
        slot: &SharedQueue,
        policy: QueuePolicy,
    ) -> Result<Result<Commit, BrokerError>, BrokerError> {
        let mut catalog = lock(&self.inner.catalog);
        let q = lock(&slot.queue);
        let old = q.policy().dead_letter_queue.clone();
        let new = &policy.dead_letter_queue;
        if old != *new {
            let extra = self.dead_letter_slot(&catalog, new, "");
            let in_use = self.inner.queues.len() + catalog.reserved;
            if in_use + extra > self.inner.config.limits.max_queues {
                return Err(self.too_many_queues(
                    "policy.dead_letter_queue",
                    format!("dead-letter queue {new:?}"),
                    in_use,
                ));
            }
            self.add_dead_letter_ref(&mut catalog, new);
            self.drop_dead_letter_ref(&mut catalog, &old);
        }
        drop(catalog);
        let mut q = Accounted::new(q, &self.inner.memory);
        q.set_policy(policy);
        let mut batch = self.batch();
        batch.queue_def(&slot.name, q.policy(), q.is_paused());
        Ok(self.commit(batch, now_ms()))
    }

    /// Creates a queue with a policy.
    pub async fn create_queue(
        &self,
        name: &str,
        patch: PolicyPatch,
    ) -> Result<QueueInfo, BrokerError> {
        validate_name("name", name)?;
        let policy = self.apply_patch(name, QueuePolicy::default_for(name), patch)?;
        if self.inner.queues.contains_key(name) {
            return Err(BrokerError::AlreadyExists(format!(
                "queue {name:?} already exists (use UpdateQueue)"
            )));
        }
        self.wait_for_log_space().await?;
        let (slot, commit) = {
            let _change = self.begin()?;
            let slot = self.create_queue_slot("name", name, policy.clone(), Creation::Counted)?;
            let commit = self.set_policy(&slot, policy)?;
            (slot, commit)
        };
        self.rebuild_bindings();
        self.durable(commit?).await?;
        Ok(Self::info(&slot))
    }

    /// Changes a queue's policy.
    pub async fn update_queue(
        &self,
        name: &str,
        patch: PolicyPatch,
    ) -> Result<QueueInfo, BrokerError> {
        let slot = self.existing_queue("name", name)?;
        let current = lock(&slot.queue).policy().clone();
        let policy = self.apply_patch(name, current, patch)?;
        self.wait_for_log_space().await?;
        let commit = {
            let _change = self.begin()?;
            self.set_policy(&slot, policy)?
        };
        self.rebuild_bindings();
        self.durable(commit?).await?;
        Ok(Self::info(&slot))
    }

    /// Cancels every unleased job of a queue.
    pub async fn purge_queue(&self, name: &str) -> Result<u64, BrokerError> {
        let slot = self.existing_queue("name", name)?;
        self.wait_for_log_space().await?;
        let now = now_ms();
        let (purged, commit) = {
            let _change = self.begin()?;
            self.with_queue(&slot, |q, batch| {
                let ids = q.purge_ids(now);
                if batch.is_enabled() {
                    for id in &ids {
                        if let Some(job) = q.get(id) {
                            batch.job_state(&slot.name, &job);
                        }
                    }
                }
                ids.len() as u64
            })?
        };
        self.durable(commit).await?;
        Ok(purged)
    }

    /// Deletes a queue and everything in it. A queue whose name is not valid can still be
    /// deleted by that exact name: older brokers made such queues when a redrive followed
    /// a header (issue 17), and their data directories bring them back.
    pub async fn delete_queue(&self, name: &str) -> Result<(), BrokerError> {
        if let Err(invalid) = validate_name("name", name)
            && !self.inner.queues.contains_key(name)
        {
            return Err(invalid);
        }
        self.wait_for_log_space().await?;
        let commit = {
            let _change = self.begin()?;
            let mut catalog = lock(&self.inner.catalog);
            let (_, slot) =
                self.inner.queues.remove(name).ok_or_else(|| {
                    BrokerError::NotFound(format!("queue {name:?} does not exist"))
                })?;
            // A dead-letter queue that policies still name keeps its slot: its next dead
            // letter creates it again.
            if catalog.dead_letter_refs.contains_key(name) {
                catalog.reserved += 1;
            }
            let commit = {
                let q = lock(&slot.queue);
                self.drop_dead_letter_ref(&mut catalog, &q.policy().dead_letter_queue);
                // Everything it held goes with it.
                self.inner.memory.changed(q.payload_bytes(), 0);
                drop(catalog);
                let mut batch = self.batch();
                batch.queue_delete(name);
                self.commit(batch, now_ms())
            };
            slot.deleted.store(true, Ordering::Release);
            // Every waiter must see the deletion, not one.
            slot.ready.notify_waiters();
            commit
        };
        self.rebuild_bindings();
        if let Some(observer) = self.inner.observer.get() {
            observer.queue_deleted(name);
        }
        self.durable(commit?).await
    }

    /// Pauses or resumes leasing.
    pub async fn set_paused(&self, name: &str, paused: bool) -> Result<QueueInfo, BrokerError> {
        let slot = self.existing_queue("name", name)?;
        self.wait_for_log_space().await?;
        let ((), commit) = {
            let _change = self.begin()?;
            self.with_queue(&slot, |q, batch| {
                q.set_paused(paused);
                batch.queue_paused(&slot.name, paused);
            })?
        };
        self.durable(commit).await?;
        Ok(Self::info(&slot))
    }

    /// Every queue.
    pub fn list_queues(&self) -> Vec<QueueInfo> {
        let mut out: Vec<QueueInfo> = self
            .inner
            .queues
            .iter()
            .map(|e| Self::info(e.value()))
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    /// Moves dead jobs back to the queues they were dead-lettered from (the origin the
    /// broker recorded, never a header), at most `rate_per_second` a second. Jobs the
    /// broker never dead-lettered have no origin and are skipped.
    ///
    /// Before anything moves, every queue the request would move jobs into is checked:
    /// `access` must allow `enqueue` or `admin` on it (PERMISSION_DENIED otherwise), and
    /// one that no longer exists must fit under `--max-queues` (RESOURCE_EXHAUSTED). Jobs
    /// dead-lettered into the queue while the redrive runs, from queues not checked then,
    /// stay where they are.
    pub async fn redrive(
        &self,
        dead_letter_queue: &str,
        ids: &[String],
        rate_per_second: u32,
        max_jobs: u64,
        access: &Access,
    ) -> Result<RedriveOutcome, BrokerError> {
        let limits = &self.inner.config.limits;
        if ids.len() > limits.max_batch {
            return Err(BrokerError::over_limit(
                "job_ids",
                ids.len() as u64,
                limits.max_batch as u64,
                "ids",
            ));
        }
        check_count("rate_per_second", rate_per_second.into(), MAX_REDRIVE_RATE)?;
        check_count("max_jobs", max_jobs, MAX_QUEUE_DEPTH)?;
        let uuids = ids
            .iter()
            .enumerate()
            .map(|(i, id)| Self::parse_job_id(&format!("job_ids[{i}]"), id))
            .collect::<Result<Vec<_>, _>>()?;
        let slot = self.existing_queue("dead_letter_queue", dead_letter_queue)?;
        let field = if uuids.is_empty() {
            "dead_letter_queue"
        } else {
            "job_ids"
        };
        let limit = usize::try_from(max_jobs)
            .ok()
            .filter(|n| *n > 0)
            .unwrap_or(usize::MAX);
        let targets = lock(&slot.queue).redrive_targets(&uuids, limit);
        for target in &targets {
            access.check_any(&[Action::Enqueue, Action::Admin], field, target)?;
        }
        self.check_queue_room(field, targets.iter().map(String::as_str))?;
        for target in &targets {
            self.queue_or_create(field, target)?;
        }
        let rate = if rate_per_second == 0 {
            1_000
        } else {
            rate_per_second
        } as usize;
        // Ten steps a second keep the rate smooth.
        let step = rate.div_ceil(10);
        let mut outcome = RedriveOutcome::default();
        let mut pending_ids: &[Uuid] = &uuids;
        let mut ticker = tokio::time::interval(Duration::from_millis(100));
        loop {
            ticker.tick().await;
            let budget = if max_jobs == 0 {
                step
            } else {
                step.min((max_jobs - outcome.redriven) as usize)
            };
            let (chunk, rest) = pending_ids.split_at(pending_ids.len().min(budget));
            pending_ids = rest;
            self.wait_for_log_space().await?;
            let (count, commit) = {
                // One change from taking the jobs out to putting them back, so a snapshot
                // never sees them in neither queue.
                let _change = self.begin()?;
                let ids: &[Uuid] = if uuids.is_empty() { &[] } else { chunk };
                let ((moved, skipped), commit) = self.with_queue(&slot, |q, batch| {
                    let (moved, skipped) = q
                        .take_for_redrive(now_ms(), ids, budget, |origin| targets.contains(origin));
                    for job in &moved {
                        batch.redriven(&slot.name, job);
                    }
                    (moved, skipped)
                })?;
                outcome.skipped.extend(skipped);
                let count = moved.len() as u64;
                let now = now_ms();
                for job in moved {
                    // Checked and created above; only a deletion since then makes it
                    // again here, and a job already taken out must land.
                    let target = match self.inner.queues.get(job.target.as_str()) {
                        Some(slot) => slot.value().clone(),
                        None => self.create_queue_slot(
                            field,
                            &job.target,
                            QueuePolicy::default_for(&job.target),
                            Creation::DeadLetters,
                        )?,
                    };
                    // Already logged with the take above.
                    let ((), _logged) = self.with_queue(&target, |q, _| q.restore(now, job))?;
                }
                (count, commit)
            };
            self.durable(commit).await?;
            outcome.redriven += count;
            let done = if uuids.is_empty() {
                count < budget as u64
            } else {
                pending_ids.is_empty()
            };
            if done
                || (max_jobs > 0 && outcome.redriven >= max_jobs)
                || self.inner.shutdown.is_cancelled()
            {
                return Ok(outcome);
            }
        }
    }

    /// Refuses, before anything is created, queues `names` (with default policies) that
    /// would not all fit under `--max-queues`.
    fn check_queue_room<'a>(
        &self,
        field: &str,
        names: impl Iterator<Item = &'a str>,
    ) -> Result<(), BrokerError> {
        let catalog = lock(&self.inner.catalog);
        let takes_slot = |name: &str| {
            !name.is_empty()
                && !self.inner.queues.contains_key(name)
                && !catalog.dead_letter_refs.contains_key(name)
        };
        let mut new: BTreeSet<String> = BTreeSet::new();
        for name in names {
            let dlq = QueuePolicy::default_for(name).dead_letter_queue;
            for n in [name, dlq.as_str()] {
                if takes_slot(n) {
                    new.insert(n.to_owned());
                }
            }
        }
        let in_use = self.inner.queues.len() + catalog.reserved;
        if in_use + new.len() > self.inner.config.limits.max_queues {
            let names: Vec<String> = new.into_iter().collect();
            return Err(self.too_many_queues(
                field,
                format!("queues {}", names.join(", ")),
                in_use,
            ));
        }
        Ok(())
    }

    /// Consumers seen on a queue.
    pub fn list_consumers(
        &self,
        queue: &str,
    ) -> Result<Vec<(Arc<str>, ConsumerState)>, BrokerError> {
        let slot = self.existing_queue("queue", queue)?;
        Ok(lock(&slot.queue).consumers())
    }

    // ---- topics ---------------------------------------------------------------------------

    /// The topic, created (with `retention`, or the default) on first use. Creation runs
    /// under the registry lock and attaches every matching subscription.
    fn topic_or_create(
        &self,
        field: &str,
        name: &str,
        retention: Option<Retention>,
    ) -> Result<Arc<SharedTopic>, BrokerError> {
        if let Some(slot) = self.inner.topics.get(name) {
            return Ok(slot.value().clone());
        }
        let registry = lock(&self.inner.registry);
        if let Some(slot) = self.inner.topics.get(name) {
            return Ok(slot.value().clone());
        }
        let max = self.inner.config.limits.max_topics;
        if self.inner.topics.len() >= max {
            return Err(BrokerError::ResourceExhausted(format!(
                "{field}: cannot create topic {name:?}: the broker holds the maximum of {max} topics"
            )));
        }
        let slot = Arc::new(SharedTopic {
            name: Arc::from(name),
            topic: Mutex::new(Topic::new(name, retention.unwrap_or_default())),
            durable_seq: AtomicU64::new(1),
            subscribers: Mutex::new(Vec::new()),
            deleted: AtomicBool::new(false),
            gaps: AtomicU64::new(0),
        });
        let matching: Vec<Arc<SubscriberShared>> = registry
            .subscriptions
            .iter()
            .filter(|s| s.pattern.matches(name))
            .cloned()
            .collect();
        for sub in &matching {
            lock(&sub.new_topics).push(slot.clone());
            sub.wake();
        }
        *lock(&slot.subscribers) = matching;
        self.inner.topics.insert(slot.name.clone(), slot.clone());
        Ok(slot)
    }

    /// Creates a topic or changes its retention.
    pub async fn create_topic(
        &self,
        name: &str,
        retention: Retention,
    ) -> Result<Retention, BrokerError> {
        validate_name("name", name)?;
        validate_retention(&retention)?;
        self.wait_for_log_space().await?;
        let (effective, commit) = {
            let _change = self.begin()?;
            let slot = self.topic_or_create("name", name, Some(retention))?;
            let mut topic = self.lock_topic(&slot);
            let now = now_ms();
            topic.set_retention(retention, now);
            let mut batch = self.batch();
            batch.topic_def(name, topic.retention());
            (topic.retention(), self.commit(batch, now))
        };
        self.durable(commit?).await?;
        Ok(effective)
    }

    /// Deletes a topic and its log.
    pub async fn delete_topic(&self, name: &str) -> Result<(), BrokerError> {
        validate_name("name", name)?;
        self.wait_for_log_space().await?;
        let commit = {
            let _change = self.begin()?;
            let _registry = lock(&self.inner.registry);
            let (_, slot) =
                self.inner.topics.remove(name).ok_or_else(|| {
                    BrokerError::NotFound(format!("topic {name:?} does not exist"))
                })?;
            let commit = {
                let topic = lock(&slot.topic);
                self.inner.memory.changed(topic.retained().1, 0);
                let mut batch = self.batch();
                batch.topic_delete(name);
                self.commit(batch, now_ms())
            };
            slot.deleted.store(true, Ordering::Release);
            slot.wake_subscribers();
            commit
        };
        if let Some(observer) = self.inner.observer.get() {
            observer.topic_deleted(name);
        }
        self.durable(commit?).await
    }

    /// Opens a subscription. The returned [`Subscription`] is a stream that reads the
    /// matching topics' logs each time it is polled, and ends on shutdown.
    pub fn subscribe(&self, spec: SubscribeSpec) -> Result<Subscription, BrokerError> {
        let id = self.inner.next_subscription.fetch_add(1, Ordering::Relaxed);
        subscription::open(self.inner.clone(), id, spec)
    }

    // ---- stats ------------------------------------------------------------------------------

    /// Counters of the named queues and topics (all when the lists are empty).
    pub fn stats(&self, queues: &[String], topics: &[String]) -> StatsSnapshot {
        let now = now_ms();
        let mut snapshot = StatsSnapshot {
            taken_at: now,
            memory_budget_bytes: self.inner.memory.limit(),
            memory_used_bytes: self.inner.memory.used(),
            storage: self.storage_status(),
            ..StatsSnapshot::default()
        };
        for entry in self.inner.queues.iter() {
            if !queues.is_empty() && !queues.iter().any(|q| **q == **entry.key()) {
                continue;
            }
            let counts = lock(&entry.value().queue).counts(now);
            snapshot.queues.push((entry.key().to_string(), counts));
        }
        snapshot.queues.sort_by(|a, b| a.0.cmp(&b.0));
        for entry in self.inner.topics.iter() {
            if !topics.is_empty() && !topics.iter().any(|t| **t == **entry.key()) {
                continue;
            }
            let slot = entry.value();
            let t = lock(&slot.topic);
            let (retained_messages, retained_bytes) = t.retained();
            let (published, publish_rate) = t.published(now);
            let next = t.next_seq();
            snapshot.topics.push(TopicCounts {
                name: entry.key().to_string(),
                first_sequence: if retained_messages == 0 {
                    0
                } else {
                    t.first_seq()
                },
                last_sequence: next - 1,
                retained_messages,
                retained_bytes,
                subscribers: lock(&slot.subscribers).len() as u32,
                gaps: slot.gaps.load(Ordering::Relaxed),
                published,
                publish_rate,
            });
        }
        snapshot.topics.sort_by(|a, b| a.name.cmp(&b.name));
        snapshot
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A data directory written by an older broker can hold queues with invalid names
    /// (a redrive once followed a header): they load, and DeleteQueue removes them by
    /// their exact name. A name that is invalid and unknown is still INVALID_ARGUMENT.
    #[tokio::test]
    async fn a_queue_with_an_invalid_name_from_older_data_can_be_deleted() {
        let broker = Broker::new(BrokerConfig::default());
        for name in ["bad name!/..", ""] {
            // Like recovery, which loads every queue of the log: no name check.
            broker
                .create_queue_slot(
                    "name",
                    name,
                    QueuePolicy::default_for(name),
                    Creation::DeadLetters,
                )
                .unwrap();
        }
        assert_eq!(broker.list_queues().len(), 2);
        broker.delete_queue("bad name!/..").await.unwrap();
        broker.delete_queue("").await.unwrap();
        assert!(broker.list_queues().is_empty());
        let err = broker.delete_queue("other bad!").await.unwrap_err();
        assert!(matches!(err, BrokerError::InvalidArgument { .. }), "{err}");
        broker.shutdown();
    }
}
