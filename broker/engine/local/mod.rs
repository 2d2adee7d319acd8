//! The broker's shared state: a cheap-clone [`Broker`] handle over `Arc`.
//!
//! Each queue and topic sits behind its own std mutex, held only for short, non-async
//! sections. The one place that holds several at once is a publish to a topic with bound
//! queues (topic first, then queues in name order), which keeps it atomic and deadlock-free:
//! every other path holds at most one queue lock at a time.

pub(crate) mod consume;
pub(crate) mod memory;
pub(crate) mod stats;
pub(crate) mod subscription;

pub(crate) mod admin;
mod background;
mod catalog;
mod engine;
pub(crate) mod queues;
mod schedules;
mod schemas;
mod storage;
mod topics;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use dashmap::DashMap;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::broker::domain::error::BrokerError;
use crate::broker::domain::limits::Limits;
use crate::broker::domain::names::Pattern;
use crate::broker::domain::observe::Observer;
use crate::broker::domain::queue::Queue;
use crate::broker::domain::topic::Topic;
use crate::broker::engine::local::memory::{Accounted, MemoryBudget};
use crate::broker::engine::local::subscription::SubscriberShared;
use crate::broker::store::{Commit, DurableListener, Journal, RecoveryReport};
use crate::broker::sync::lock;

pub(crate) use admin::RedriveOutcome;
pub(in crate::broker) use admin::{PolicyPatch, QueueInfo};
use catalog::QueueCatalog;
pub(crate) use storage::StorageStatus;

/// Longest long-poll wait.
pub(in crate::broker) const MAX_LEASE_WAIT_MS: u64 = 60_000;
/// Header carrying the topic sequence on jobs created by a binding.
pub(in crate::broker) const HEADER_TOPIC_SEQUENCE: &str = "x-sluice-topic-sequence";

/// The in-process engine's logged change: its durability wait is a log position. Log
/// positions only grow, so confirming changes in the order they were logged never waits
/// out of turn.
pub(crate) type Logged<T> = crate::broker::engine::Logged<T, Commit>;

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
    /// The stats snapshot shared by watchers (see [`crate::broker::engine::local::stats`]).
    pub(crate) stats: crate::broker::engine::local::stats::StatsHub,
    /// What recovery did at startup (WAL storage only), for Stats.
    recovery: OnceLock<RecoveryReport>,
    /// Recurring schedules; locked before a queue when both are (a fire), never after.
    schedules: Mutex<schedules::Schedules>,
    /// Message schemas of queues and topics.
    schemas: schemas::SchemaRegistry,
}

/// The broker. Clone it freely: clones share one state.
#[derive(Clone)]
pub struct Broker {
    pub(crate) inner: Arc<Inner>,
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
                schedules: Mutex::default(),
                schemas: Default::default(),
                stats: Default::default(),
                memory: MemoryBudget::new(config.limits.max_memory_bytes),
                config,
            }),
        }
    }

    /// Refuses a request for more than `--max-batch` items: `n` of them, in `field`.
    pub(crate) fn check_batch(&self, field: &str, n: usize, unit: &str) -> Result<(), BrokerError> {
        super::checks::batch(&self.inner.config.limits, field, n, unit)
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
}
