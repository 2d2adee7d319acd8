//! Work-queue operations on jobs: enqueue, lease, ack, nack, extend, cancel, get, list
//! and history, and routing dead letters.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;

use crate::broker::auth::Access;
use crate::broker::domain::error::BrokerError;
use crate::broker::domain::limits::check_duration_ms;
use crate::broker::domain::queue::{
    DeadLetter, Delivery, Enqueued, FailOutcome, Job, JobState, LeaseId, MAX_VISIBILITY_MS, NewJob,
    Queue, QueuePolicy,
};
use crate::broker::domain::schema::TargetKind;
use crate::broker::domain::time::{Millis, now_ms};
use crate::broker::engine::checks;
use crate::broker::engine::local::memory::Accounted;
use crate::broker::store::Batch;
use crate::broker::sync::lock;

use super::catalog::Creation;
use super::{Broker, Logged, MAX_LEASE_WAIT_MS, SharedQueue};

/// Stores `jobs` in the locked queue `q` (named `name`) and records in `batch` each job
/// it stored, from what the queue holds; with nothing logged, no record is made.
pub(in crate::broker) fn enqueue_recording(
    batch: &mut Batch,
    name: &str,
    q: &mut Queue,
    now: Millis,
    jobs: Vec<NewJob>,
) -> Result<Vec<Enqueued>, BrokerError> {
    if batch.is_enabled() {
        q.enqueue_recorded(now, jobs, |job| batch.new_job(name, job))
    } else {
        q.enqueue(now, jobs)
    }
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

impl Broker {
    /// Moves dead letters into their dead-letter queues, at `now` (the time of the change
    /// that killed them).
    pub(in crate::broker) fn route_dead_letters(&self, letters: Vec<DeadLetter>, now: Millis) {
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
        let logged = self
            .enqueue_logged(queue, jobs.into_iter().map(Ok), now_ms())
            .await?;
        self.confirm(logged).await
    }

    /// [`Broker::enqueue`] up to the log append: the jobs are stored (visible to workers)
    /// and their records appended, but not yet durable. A pipelined stream answers
    /// requests in order through [`Broker::confirm`], so their fsyncs overlap.
    ///
    /// Every check of the request is made here, once. `jobs` may still be converting from
    /// a transport's form: a job that fails to convert refuses the request after the
    /// batch size is checked and before the queue name and the jobs' limits are. `now` is
    /// the request's time (the one its jobs' delays were resolved with).
    pub async fn enqueue_logged(
        &self,
        queue: &str,
        jobs: impl ExactSizeIterator<Item = Result<NewJob, BrokerError>>,
        now: Millis,
    ) -> Result<Logged<Vec<Enqueued>>, BrokerError> {
        let limits = &self.inner.config.limits;
        let jobs = checks::enqueue(limits, queue, jobs)?;
        self.check_schema(
            TargetKind::Queue,
            queue,
            "jobs",
            jobs.iter().map(|j| (&j.payload[..], &j.headers)),
        )?;
        if self.inner.memory.is_limited() {
            let bytes = jobs.iter().map(|j| j.payload.len() as u64).sum();
            self.inner.memory.check("jobs", bytes)?;
        }
        self.wait_for_log_space().await?;
        let (results, commit) = {
            let _change = self.begin()?;
            let slot = self.queue_or_create("queue", queue)?;
            self.with_queue(&slot, now, |q, batch| {
                enqueue_recording(batch, &slot.name, q, now, jobs)
            })?
        };
        Ok(Logged {
            value: results?,
            commit,
        })
    }

    /// Leases jobs, long-polling up to `wait_ms` when none is visible.
    pub async fn lease(
        &self,
        queue: &str,
        params: LeaseParams,
    ) -> Result<Vec<Delivery>, BrokerError> {
        self.check_batch("max_jobs", params.max_jobs, "jobs")?;
        if let Some(v) = params.visibility_timeout_ms {
            check_duration_ms("visibility_timeout_ms", v, MAX_VISIBILITY_MS)?;
        }
        check_duration_ms("wait_ms", params.wait_ms, MAX_LEASE_WAIT_MS)?;
        let slot = self.queue_for_consumer("queue", queue)?;
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
                self.with_queue(&slot, now, |q, _| {
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
                let in_ms = due.saturating_sub(now);
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

    pub(in crate::broker) fn lease_queue(
        &self,
        lease: &LeaseId,
    ) -> Result<Arc<SharedQueue>, BrokerError> {
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
    /// once the acks are durable. [`Broker::ack_as`] with access to every queue.
    pub async fn ack(&self, acks: Vec<(String, Option<Bytes>)>) -> Result<(), BrokerError> {
        self.ack_as(&Access::open(), acks).await
    }

    /// [`Broker::ack`] for a request that may settle only leases of the queues `access`
    /// lets it consume from. Each lease id is parsed once. Refusals come in this order:
    /// the batch size; a lease of a queue it may not consume from; the first malformed
    /// lease id or oversized result; stale leases.
    pub async fn ack_as(
        &self,
        access: &Access,
        acks: Vec<(String, Option<Bytes>)>,
    ) -> Result<(), BrokerError> {
        let parsed = checks::acks(&self.inner.config.limits, access, acks)?;
        self.wait_for_log_space().await?;
        self.ack_leases(parsed, now_ms()).await
    }

    /// Acks parsed and authorized leases at `now`, all or none; each lease is checked
    /// once. Answers once the acks are durable.
    pub(in crate::broker) async fn ack_leases(
        &self,
        mut acks: Vec<(LeaseId, Option<Bytes>)>,
        now: Millis,
    ) -> Result<(), BrokerError> {
        let mut by_queue: HashMap<Arc<str>, Vec<usize>> = HashMap::new();
        for (i, (lease, _)) in acks.iter().enumerate() {
            by_queue.entry(lease.queue.clone()).or_default().push(i);
        }
        let mut names: Vec<Arc<str>> = by_queue.keys().cloned().collect();
        names.sort_unstable();
        let change = self.begin()?;
        let mut slots = Vec::with_capacity(names.len());
        for name in &names {
            let first = by_queue[name][0];
            slots.push(self.lease_queue(&acks[first].0)?);
        }
        // Lease-to-ack times, collected only when something measures them.
        let observer = self.inner.observer.get();
        let mut acked: Vec<(usize, u64)> = Vec::new();
        let commit = {
            let mut guards: Vec<Accounted<'_, Queue>> =
                slots.iter().map(|s| self.lock_queue(s)).collect();
            let mut stale = Vec::new();
            for (guard, name) in guards.iter().zip(&names) {
                for &i in &by_queue[name] {
                    if let Err(e) = guard.check_lease(now, &acks[i].0) {
                        stale.push(e.to_string());
                    }
                }
            }
            if !stale.is_empty() {
                return Err(checks::stale_acks(&stale, acks.len()));
            }
            let mut batch = self.batch();
            for (q, (guard, name)) in guards.iter_mut().zip(&names).enumerate() {
                for &i in &by_queue[name] {
                    let (lease, result) = &mut acks[i];
                    let held = guard.ack_checked(now, lease, result.take());
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
            if lock(&slot.queue).has_visible(now) {
                slot.wake_one();
            }
        }
        self.durable(commit?).await
    }

    /// Fails a delivery (retry or dead-letter); answers once that is durable.
    /// [`Broker::nack_as`] with access to every queue.
    pub async fn nack(
        &self,
        lease_id: &str,
        error: String,
        retry_delay_ms: Option<u64>,
        dead_letter: bool,
    ) -> Result<(JobState, Option<Millis>), BrokerError> {
        self.nack_as(
            &Access::open(),
            lease_id,
            error,
            retry_delay_ms,
            dead_letter,
        )
        .await
    }

    /// [`Broker::nack`] for a request that may settle only leases of the queues `access`
    /// lets it consume from.
    pub async fn nack_as(
        &self,
        access: &Access,
        lease_id: &str,
        error: String,
        retry_delay_ms: Option<u64>,
        dead_letter: bool,
    ) -> Result<(JobState, Option<Millis>), BrokerError> {
        let lease = checks::authorized_lease(access, "lease_id", lease_id)?;
        checks::nack(&self.inner.config.limits, "", &error, retry_delay_ms)?;
        self.wait_for_log_space().await?;
        let now = now_ms();
        let (outcome, commit) = {
            let _change = self.begin()?;
            let slot = self.lease_queue(&lease)?;
            self.with_queue(&slot, now, |q, batch| {
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

    /// Extends a live lease; returns the new deadline. [`Broker::extend_lease_as`] with
    /// access to every queue.
    pub fn extend_lease(
        &self,
        lease_id: &str,
        visibility_timeout_ms: u64,
    ) -> Result<Millis, BrokerError> {
        self.extend_lease_as(&Access::open(), lease_id, visibility_timeout_ms)
    }

    /// [`Broker::extend_lease`] for a request that may extend only leases of the queues
    /// `access` lets it consume from.
    pub fn extend_lease_as(
        &self,
        access: &Access,
        lease_id: &str,
        visibility_timeout_ms: u64,
    ) -> Result<Millis, BrokerError> {
        let lease = checks::authorized_lease(access, "lease_id", lease_id)?;
        checks::visibility("visibility_timeout_ms", visibility_timeout_ms)?;
        let _change = self.begin()?;
        let slot = self.lease_queue(&lease)?;
        let now = now_ms();
        // Not logged: leases do not survive a restart anyway.
        self.with_queue(&slot, now, |q, _| {
            q.extend(now, &lease, visibility_timeout_ms)
        })?
        .0
    }

    // ---- inspection -------------------------------------------------------------------

    pub(in crate::broker) fn queues_to_search(
        &self,
        queue: Option<&str>,
    ) -> Result<Vec<Arc<SharedQueue>>, BrokerError> {
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
        let uuid = checks::job_id("id", id)?;
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
        let uuid = checks::job_id("id", id)?;
        self.wait_for_log_space().await?;
        for slot in self.queues_to_search(queue)? {
            let known = lock(&slot.queue)
                .get(&uuid)
                .is_some_and(|j| !j.state.is_finished());
            if known {
                let now = now_ms();
                let (job, commit) = {
                    let _change = self.begin()?;
                    self.with_queue(&slot, now, |q, batch| {
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

    /// Deletes job `id` of `queue` whatever its state; returns it as it was, once the
    /// delete is durable.
    pub async fn delete_job(&self, queue: &str, id: &str) -> Result<Job, BrokerError> {
        let uuid = checks::job_id("job_id", id)?;
        let slot = self.existing_queue("queue", queue)?;
        self.wait_for_log_space().await?;
        let now = now_ms();
        let (job, commit) = {
            let _change = self.begin()?;
            self.with_queue(&slot, now, |q, batch| {
                let job = q.delete(now, &uuid)?;
                batch.job_removed(&slot.name, &uuid);
                Ok::<_, BrokerError>(job)
            })?
        };
        let job = job?;
        self.durable(commit).await?;
        Ok(job)
    }

    /// A page of a queue's jobs in one state (live ones if `None`).
    pub fn list_jobs(
        &self,
        queue: &str,
        state: Option<JobState>,
        page_size: usize,
        page_token: &str,
    ) -> Result<(Vec<Job>, Option<u64>), BrokerError> {
        self.check_batch("page_size", page_size, "jobs")?;
        let after = checks::page_token(page_token)?;
        let slot = self.existing_queue("queue", queue)?;
        let size = if page_size == 0 { 100 } else { page_size };
        Ok(lock(&slot.queue).list(state, after, size))
    }

    /// The newest finished jobs of a queue.
    pub fn job_history(&self, queue: &str, limit: usize) -> Result<Vec<Job>, BrokerError> {
        self.check_batch("limit", limit, "jobs")?;
        let slot = self.existing_queue("queue", queue)?;
        Ok(lock(&slot.queue).history(if limit == 0 { 100 } else { limit }))
    }

    // ---- queue administration -----------------------------------------------------------
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::engine::local::{BrokerConfig, PolicyPatch};

    fn lease_params(max_jobs: usize) -> LeaseParams {
        LeaseParams {
            max_jobs,
            visibility_timeout_ms: None,
            wait_ms: 0,
            consumer: "worker".into(),
            address: "127.0.0.1:1".into(),
        }
    }

    /// An Ack that names one lease twice acks it once, even when the acks between them
    /// push its record out of history: the second is a repeat ack, not a broker panic.
    #[tokio::test]
    async fn an_ack_naming_a_lease_twice_acks_it_once() {
        let broker = Broker::new(BrokerConfig::default());
        let policy = PolicyPatch {
            history_limit: Some(1),
            ..PolicyPatch::default()
        };
        broker.create_queue("q", policy).await.unwrap();
        let jobs = ["a", "b"].map(|p| NewJob {
            payload: Bytes::from_static(p.as_bytes()),
            ..NewJob::default()
        });
        broker.enqueue("q", jobs.to_vec()).await.unwrap();
        let got = broker.lease("q", lease_params(2)).await.unwrap();
        let [a, b] = [0, 1].map(|i| got[i].lease_id.to_string());
        broker
            .ack(vec![(a.clone(), None), (b, None), (a, None)])
            .await
            .unwrap();
        let history = broker.job_history("q", 10).unwrap();
        assert_eq!(history.len(), 1);
        let slot = broker.existing_queue("queue", "q").unwrap();
        let counts = lock(&slot.queue).counts(now_ms());
        assert_eq!((counts.completed, counts.leased), (2, 0));
        broker.shutdown();
    }
}
