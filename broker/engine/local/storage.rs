//! The broker's side of durability: opening from the store, journaling each change
//! (batch, begin, commit, wait until durable), compaction snapshots and the fail-stop
//! reload of durable state.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLockReadGuard};

use tokio::sync::Notify;

use crate::broker::domain::error::BrokerError;
use crate::broker::domain::queue::Queue;
use crate::broker::domain::schedule::{Schedule, ScheduleBook};
use crate::broker::domain::time::{Millis, now_ms};
use crate::broker::domain::topic::Topic;
use crate::broker::store::{
    Batch, Commit, Journal, RecoveryError, RecoveryReport, SnapshotQueue, SnapshotState,
    SnapshotTopic, Storage, StoreConfig, StoreError, recover,
};
use crate::broker::sync::lock;

use super::catalog::QueueCatalog;
use super::{Broker, BrokerConfig, Logged, SharedQueue};

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

impl Broker {
    /// A broker whose state survives restarts: recovers it from the write-ahead log in
    /// `storage` (any [`Storage`](crate::broker::Storage)), writes a snapshot of it so the
    /// old log files can go, and logs every later change. Leased jobs are visible again.
    /// Must be called inside a Tokio runtime; blocks while it reads the log.
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
        broker.install_state(recovered.queues, recovered.topics, recovered.schedules);
        broker.install_schemas(recovered.schemas);
        // The recovered state becomes the base of the new log, so every older file (and
        // any torn tail) is gone after this and recovery time stays proportional to the
        // live data. A disk that cannot take it (full, failing) still serves what it
        // holds: the broker starts fail-stopped, read-only.
        let unwritable = recovered.write_failure.or_else(|| {
            journal
                .write_snapshot(first, 0, broker.capture(), now_ms())
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
    pub(in crate::broker) fn install_state(
        &self,
        queues: Vec<Queue>,
        topics: Vec<Topic>,
        schedules: Vec<Schedule>,
    ) {
        {
            let mut book = ScheduleBook::default();
            for s in schedules {
                book.put(s);
            }
            lock(&self.inner.schedules).book = book;
        }
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
                self.register_topic(&registry, topic);
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

    /// Blocking: replaces the live state with what is durable on disk.
    pub(in crate::broker) fn revert_to_durable(
        &self,
        journal: &Journal,
    ) -> Result<(), RecoveryError> {
        // No compaction deletes files while they are read, and no change is half-made.
        let Some(_slot) = journal.compaction_slot() else {
            return Ok(());
        };
        let _exclusive = journal.exclusive();
        let durable = journal.reload(now_ms())?;
        self.install_state(durable.queues, durable.topics, durable.schedules);
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
    pub(in crate::broker) fn batch(&self) -> Batch {
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
    pub(in crate::broker) fn commit(
        &self,
        batch: Batch,
        at: Millis,
    ) -> Result<Commit, BrokerError> {
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

    /// Snapshots the state at a fresh segment boundary and deletes the files before it.
    /// Blocking; returns the snapshot's size.
    pub(in crate::broker) fn compact(&self) -> Result<u64, BrokerError> {
        let journal = self
            .inner
            .journal
            .as_ref()
            .expect("only a broker with a log compacts");
        let Some(_slot) = journal.compaction_slot() else {
            return Ok(0);
        };
        let (base, last, state) = {
            let _exclusive = journal.exclusive();
            let (base, last) = journal.roll();
            (base, last, self.capture())
        };
        Ok(journal.write_snapshot(base, last, state, now_ms())?)
    }

    /// Copies the persistent state of every queue and topic (payloads are shared, not
    /// copied). Under the exclusive gate this is exactly the state the log describes.
    pub(in crate::broker) fn capture(&self) -> SnapshotState {
        let queues = self
            .inner
            .queues
            .iter()
            .filter_map(|entry| {
                let q = lock(&entry.value().queue);
                // Only a Lease or Consume has named it: it holds nothing, and its creation
                // was never logged, so the snapshot leaves it out as the log does.
                if q.is_created_by_consumer() {
                    return None;
                }
                let mut history = q.history(usize::MAX);
                history.reverse();
                Some(SnapshotQueue {
                    name: entry.key().to_string(),
                    policy: q.policy().clone(),
                    paused: q.is_paused(),
                    live: q.list(None, 0, usize::MAX).0,
                    history,
                    dedup: q.dedup_entries(),
                })
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
        SnapshotState {
            queues,
            topics,
            schedules: self.list_schedules(),
            schemas: self.capture_schemas(),
        }
    }

    /// Waits until a logged change is durable, then hands back its result.
    pub async fn confirm<T>(&self, logged: Logged<T>) -> Result<T, BrokerError> {
        self.durable(logged.commit).await?;
        Ok(logged.value)
    }
}
