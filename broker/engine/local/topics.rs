//! Topic operations: publish (fanning out to bound queues atomically), bindings, topic
//! creation and deletion, and opening subscriptions.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use crate::broker::domain::error::BrokerError;
use crate::broker::domain::names::{Pattern, validate_name};
use crate::broker::domain::queue::{NewJob, Queue};
use crate::broker::domain::schema::TargetKind;
use crate::broker::domain::time::now_ms;
use crate::broker::domain::topic::{Appended, NewMessage, Retention, validate_retention};
use crate::broker::engine::checks;
use crate::broker::engine::local::memory::Accounted;
use crate::broker::engine::local::subscription::{self, SubscribeSpec, Subscription};
use crate::broker::store::{Commit, DurableListener};
use crate::broker::sync::lock;

use super::queues::enqueue_recording;
use super::{Broker, HEADER_TOPIC_SEQUENCE, Logged, SharedQueue};

impl Broker {
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
    /// to live subscribers) but not yet durable; see [`Broker::enqueue_logged`]. Every
    /// check of the request is made here, once.
    pub async fn publish_logged(
        &self,
        topic: &str,
        messages: Vec<NewMessage>,
    ) -> Result<Logged<Vec<Appended>>, BrokerError> {
        checks::publish(&self.inner.config.limits, topic, &messages)?;
        self.check_schema(
            TargetKind::Topic,
            topic,
            "messages",
            messages.iter().map(|m| (&m.payload[..], &m.headers)),
        )?;
        self.wait_for_log_space().await?;
        let (value, commit) = self.publish_locked(topic, messages)?;
        Ok(Logged { value, commit })
    }

    /// The locked part of [`Broker::publish`]: appends, fans out to bound queues, logs.
    pub(in crate::broker) fn publish_locked(
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
            for (q, target) in queue_guards.iter_mut().zip(&targets) {
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
                enqueue_recording(&mut batch, &target.name, q, now, jobs)
                    .expect("capacity was checked under the same lock");
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
    pub(in crate::broker) fn bound_queues(&self, topic: &str) -> Vec<Arc<SharedQueue>> {
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

    pub(in crate::broker) fn rebuild_bindings(&self) {
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
}
