//! Queue administration: create, update (policies), purge, delete, pause, list, redrive
//! and consumers.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use uuid::Uuid;

use crate::broker::auth::{Access, Action};
use crate::broker::domain::error::BrokerError;
use crate::broker::domain::limits::{
    MAX_BACKOFF_STEPS, MAX_DEDUP_WINDOW_MS, MAX_HISTORY_LIMIT, MAX_QUEUE_DEPTH, MAX_REDRIVE_RATE,
    MAX_RETRY_DELAY_MS, MAX_TOPIC_BINDINGS, check_count, check_duration_ms,
};
use crate::broker::domain::names::{Pattern, validate_name};
use crate::broker::domain::queue::{
    Backoff, ConsumerState, MAX_IN_FLIGHT, MAX_RATE_PER_SECOND, QueuePolicy, RateLimit,
};
use crate::broker::domain::time::now_ms;
use crate::broker::engine::checks;
use crate::broker::engine::local::memory::Accounted;
use crate::broker::store::Commit;
use crate::broker::sync::lock;

use super::catalog::Creation;
use super::{Broker, SharedQueue};

/// Changes to a queue policy; `None` keeps the current (or default) value.
#[derive(Debug, Clone, Default)]
pub struct PolicyPatch {
    /// Default lease duration.
    pub visibility_timeout_ms: Option<u64>,
    /// Default max attempts.
    pub max_attempts: Option<u32>,
    /// Backoff.
    pub backoff: Option<crate::broker::domain::queue::Backoff>,
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
    /// Rate limit as asked for, checked when applied: per second and burst both 0 remove
    /// the limit, burst 0 takes `per_second`.
    pub rate_limit: Option<RateLimit>,
    /// In-flight limit; 0 removes it.
    pub max_in_flight: Option<u32>,
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

/// The result of a redrive.
#[derive(Debug, Clone, Default)]
pub struct RedriveOutcome {
    /// Jobs moved back.
    pub redriven: u64,
    /// Requested ids that could not be moved.
    pub skipped: Vec<Uuid>,
}

impl PolicyPatch {
    /// `policy` (of queue `name`) with this patch applied, every field checked; changes
    /// nothing on a refusal. Shared by every engine.
    pub(crate) fn apply_to(
        self,
        name: &str,
        mut policy: QueuePolicy,
    ) -> Result<QueuePolicy, BrokerError> {
        let patch = self;
        if let Some(v) = patch.visibility_timeout_ms {
            checks::visibility("policy.visibility_timeout_ms", v)?;
            policy.visibility_timeout_ms = v;
        }
        if let Some(v) = patch.max_attempts {
            if v == 0 {
                return Err(BrokerError::invalid(
                    "policy.max_attempts",
                    "must be at least 1",
                ));
            }
            if v > crate::broker::domain::queue::MAX_ATTEMPTS {
                return Err(BrokerError::over_limit(
                    "policy.max_attempts",
                    v.into(),
                    crate::broker::domain::queue::MAX_ATTEMPTS.into(),
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
        if let Some(rate) = patch.rate_limit {
            policy.rate_limit = Self::checked_rate_limit(rate)?;
        }
        if let Some(v) = patch.max_in_flight {
            check_count("policy.max_in_flight", v.into(), MAX_IN_FLIGHT.into())?;
            policy.max_in_flight = (v > 0).then_some(v);
        }
        Ok(policy)
    }

    /// The rate limit `asked` sets: none for 0 and 0, a burst of `per_second` for burst 0.
    fn checked_rate_limit(asked: RateLimit) -> Result<Option<RateLimit>, BrokerError> {
        let RateLimit { per_second, burst } = asked;
        if per_second == 0 {
            if burst > 0 {
                return Err(BrokerError::invalid(
                    "policy.rate_limit.per_second",
                    format!("0 with burst {burst}: set per_second (or both 0 for no limit)"),
                ));
            }
            return Ok(None);
        }
        let max = u64::from(MAX_RATE_PER_SECOND);
        check_count("policy.rate_limit.per_second", per_second.into(), max)?;
        check_count("policy.rate_limit.burst", burst.into(), max)?;
        Ok(Some(RateLimit {
            per_second,
            burst: if burst == 0 { per_second } else { burst },
        }))
    }
}

impl Broker {
    pub(in crate::broker) fn info(slot: &SharedQueue) -> QueueInfo {
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
    pub(in crate::broker) fn set_policy(
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
        let policy = patch.apply_to(name, QueuePolicy::default_for(name))?;
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
        let policy = patch.apply_to(name, current)?;
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
            self.with_queue(&slot, now, |q, batch| {
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
            self.with_queue(&slot, now_ms(), |q, batch| {
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
        self.check_batch("job_ids", ids.len(), "ids")?;
        check_count("rate_per_second", rate_per_second.into(), MAX_REDRIVE_RATE)?;
        check_count("max_jobs", max_jobs, MAX_QUEUE_DEPTH)?;
        let uuids = checks::job_ids(ids)?;
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
                let now = now_ms();
                let ((moved, skipped), commit) = self.with_queue(&slot, now, |q, batch| {
                    let (moved, skipped) =
                        q.take_for_redrive(now, ids, budget, |origin| targets.contains(origin));
                    for job in &moved {
                        batch.redriven(&slot.name, job);
                    }
                    (moved, skipped)
                })?;
                outcome.skipped.extend(skipped);
                let count = moved.len() as u64;
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
                    let ((), _logged) =
                        self.with_queue(&target, now, |q, _| q.restore(now, job))?;
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

    /// Consumers seen on a queue.
    pub fn list_consumers(
        &self,
        queue: &str,
    ) -> Result<Vec<(Arc<str>, ConsumerState)>, BrokerError> {
        let slot = self.existing_queue("queue", queue)?;
        Ok(lock(&slot.queue).consumers())
    }

    // ---- topics ---------------------------------------------------------------------------
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::engine::local::BrokerConfig;

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
