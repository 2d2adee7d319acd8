//! Which queues and topics exist: lookup, creation on first use, and the counting of
//! queues (dead-letter queues included) against `--max-queues`.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

use crate::broker::domain::error::BrokerError;
use crate::broker::domain::names::validate_name;
use crate::broker::domain::queue::{Queue, QueuePolicy};
use crate::broker::domain::time::Millis;
use crate::broker::domain::topic::{Retention, Topic};
use crate::broker::engine::checks;
use crate::broker::engine::local::subscription::SubscriberShared;
use crate::broker::store::{Batch, Commit};
use crate::broker::sync::lock;

use super::{Broker, Routing, SharedQueue, SharedTopic};

/// What `--max-queues` counts: every queue, and every dead-letter queue a policy names
/// that does not exist yet. A dead-letter queue is created by its first dead letter, which
/// must never be refused, so its slot is taken when a policy names it (the queue's
/// creation, CreateQueue, UpdateQueue) and the limit is checked then.
#[derive(Default)]
pub(in crate::broker) struct QueueCatalog {
    /// Dead-letter queue names the policies of existing queues name, with how many do.
    pub(in crate::broker) dead_letter_refs: HashMap<Arc<str>, u32>,
    /// How many of those names are not queues (yet): slots held for them.
    pub(in crate::broker) reserved: usize,
}

/// How a queue comes to be created, for [`Broker::create_queue_slot`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(in crate::broker) enum Creation {
    /// On a request: refused past `--max-queues`.
    Counted,
    /// For a dead letter: its slot was taken when a policy named it, so it is never
    /// refused; a dead-letter queue of its own it takes only if that fits.
    DeadLetters,
    /// For a Lease or Consume: counted, and unless a policy names it as its dead-letter
    /// queue, refused with `--strict-queues` or else marked created by a consumer (see
    /// [`checks::consumer_names_unknown_queue`]).
    ByConsumer,
}

impl Broker {
    pub(in crate::broker) fn existing_queue(
        &self,
        field: &str,
        name: &str,
    ) -> Result<Arc<SharedQueue>, BrokerError> {
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
        self.queue_created_as(field, name, Creation::Counted)
    }

    /// The queue a Lease or Consume reads from; one that does not exist is created as
    /// [`Creation::ByConsumer`] says.
    pub(crate) fn queue_for_consumer(
        &self,
        field: &str,
        name: &str,
    ) -> Result<Arc<SharedQueue>, BrokerError> {
        self.queue_created_as(field, name, Creation::ByConsumer)
    }

    /// The queue, created with the default policy as `creation` says if it is missing.
    fn queue_created_as(
        &self,
        field: &str,
        name: &str,
        creation: Creation,
    ) -> Result<Arc<SharedQueue>, BrokerError> {
        validate_name(field, name)?;
        if let Some(slot) = self.inner.queues.get(name) {
            return Ok(slot.value().clone());
        }
        self.create_queue_slot(field, name, QueuePolicy::default_for(name), creation)
    }

    /// Takes a slot for the dead-letter queue `dlq` a policy names (none for `""`).
    pub(in crate::broker) fn add_dead_letter_ref(&self, catalog: &mut QueueCatalog, dlq: &str) {
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
    pub(in crate::broker) fn drop_dead_letter_ref(&self, catalog: &mut QueueCatalog, dlq: &str) {
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
    pub(in crate::broker) fn dead_letter_slot(
        &self,
        catalog: &QueueCatalog,
        dlq: &str,
        own: &str,
    ) -> usize {
        usize::from(
            !dlq.is_empty()
                && dlq != own
                && !self.inner.queues.contains_key(dlq)
                && !catalog.dead_letter_refs.contains_key(dlq),
        )
    }

    /// The error for a queue count past `--max-queues`.
    pub(in crate::broker) fn too_many_queues(
        &self,
        field: &str,
        what: String,
        in_use: usize,
    ) -> BrokerError {
        checks::too_many_queues(self.inner.config.limits.max_queues, field, what, in_use)
    }

    /// Creates the queue `name` with `policy` unless it exists (then returns that one). The
    /// queue and the dead-letter queue its policy names both count against `--max-queues`
    /// (see [`QueueCatalog`]), and both must be valid names.
    pub(in crate::broker) fn create_queue_slot(
        &self,
        field: &str,
        name: &str,
        mut policy: QueuePolicy,
        how: Creation,
    ) -> Result<Arc<SharedQueue>, BrokerError> {
        let dlq = policy.dead_letter_queue.clone();
        if how != Creation::DeadLetters && !dlq.is_empty() {
            checks::dead_letter_name(field, name, &dlq)?;
        }
        let mut catalog = lock(&self.inner.catalog);
        if let Some(slot) = self.inner.queues.get(name) {
            return Ok(slot.value().clone());
        }
        // Decided under the catalog's lock: of two leases that race to create the queue,
        // one creates it (and warns), the other finds it.
        let unknown = how == Creation::ByConsumer && !catalog.dead_letter_refs.contains_key(name);
        let closest = if unknown {
            let names: Vec<Arc<str>> = self.inner.queues.iter().map(|e| e.key().clone()).collect();
            Some(checks::consumer_names_unknown_queue(
                &self.inner.config.limits,
                field,
                name,
                names.iter().map(|n| &**n),
            )?)
        } else {
            None
        };
        let in_use = self.inner.queues.len() + catalog.reserved;
        let own = usize::from(!catalog.dead_letter_refs.contains_key(name));
        let extra = self.dead_letter_slot(&catalog, &dlq, name);
        if in_use + own + extra > self.inner.config.limits.max_queues {
            match how {
                Creation::Counted | Creation::ByConsumer => {
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
        let mut queue = Queue::new(name, policy.clone());
        if closest.is_some() {
            queue.mark_created_by_consumer();
        }
        let slot = Arc::new(SharedQueue {
            name: Arc::from(name),
            queue: Mutex::new(queue),
            ready: Notify::new(),
            deleted: AtomicBool::new(false),
        });
        self.inner.queues.insert(slot.name.clone(), slot.clone());
        if catalog.dead_letter_refs.contains_key(name) {
            catalog.reserved -= 1;
        }
        self.add_dead_letter_ref(&mut catalog, &policy.dead_letter_queue);
        drop(catalog);
        if let Some(closest) = closest {
            checks::created_by_consumer(name, closest.as_deref());
        }
        Ok(slot)
    }

    /// Runs `f` on the locked queue, logs what it recorded in the batch plus any lease
    /// expiries and dead letters (still under the lock, so log order is state order), then
    /// wakes long-pollers if jobs are visible and moves dead letters to their queues
    /// (after the lock is released). `now` is the request's time, the one `f` works
    /// with: the record carries it, so recovery dates the change as it was made. Call
    /// inside [`Broker::begin`]. The commit is an error only if the log failed, after `f`
    /// ran.
    pub(crate) fn with_queue<R>(
        &self,
        slot: &SharedQueue,
        now: Millis,
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
            let commit = self.commit(batch, now);
            (result, letters, q.has_visible(now), commit)
        };
        if visible {
            slot.wake_one();
        }
        if !letters.is_empty() {
            self.route_dead_letters(letters, now);
        }
        Ok((result, commit?))
    }

    /// Refuses, before anything is created, queues `names` (with default policies) that
    /// would not all fit under `--max-queues`.
    pub(in crate::broker) fn check_queue_room<'a>(
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

    /// The topic, created (with `retention`, or the default) on first use. Creation runs
    /// under the registry lock and attaches every matching subscription.
    pub(in crate::broker) fn topic_or_create(
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
        let topic = Topic::new(name, retention.unwrap_or_default());
        Ok(self.register_topic(&registry, topic))
    }

    /// Makes `topic` one of the broker's topics: its shared slot (durable up to what it
    /// holds), attached to every open subscription whose pattern matches its name. At
    /// creation and when recovered state is installed, with the routing lock held.
    pub(in crate::broker) fn register_topic(
        &self,
        registry: &Routing,
        topic: Topic,
    ) -> Arc<SharedTopic> {
        let slot = Arc::new(SharedTopic {
            name: topic.name().clone(),
            durable_seq: AtomicU64::new(topic.next_seq()),
            topic: Mutex::new(topic),
            subscribers: Mutex::new(Vec::new()),
            deleted: AtomicBool::new(false),
            gaps: AtomicU64::new(0),
        });
        let matching: Vec<Arc<SubscriberShared>> = registry
            .subscriptions
            .iter()
            .filter(|s| s.pattern.matches(&slot.name))
            .cloned()
            .collect();
        for sub in &matching {
            lock(&sub.new_topics).push(slot.clone());
            sub.wake();
        }
        *lock(&slot.subscribers) = matching;
        self.inner.topics.insert(slot.name.clone(), slot.clone());
        slot
    }
}
