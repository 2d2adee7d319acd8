//! The Redis engine behind the [`Engine`] interface: the shared request checks, then the
//! queue's or topic's script, then the durability wait.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use tokio_util::sync::CancellationToken;

use crate::broker::auth::Access;
use crate::broker::domain::error::BrokerError;
use crate::broker::domain::limits::{Limits, check_duration_ms};
use crate::broker::domain::names::validate_name;
use crate::broker::domain::observe::Observer;
use crate::broker::domain::queue::{
    ConsumerState, Delivery, Enqueued, Job, JobState, LeaseId, NewJob, QueuePolicy,
};
use crate::broker::domain::schedule::{Schedule, ScheduleSpec};
use crate::broker::domain::schema::{SchemaDefinition, SchemaHistory, SchemaTarget};
use crate::broker::domain::time::{Millis, now_ms};
use crate::broker::domain::topic::{Appended, NewMessage, Retention, validate_retention};
use crate::broker::engine::local::{MAX_LEASE_WAIT_MS, StorageStatus};
use crate::broker::engine::{
    ConsumeCommandStream, ConsumeSpec, ConsumeStream, Engine, LeaseParams, Logged, PolicyPatch,
    QueueInfo, RedriveOutcome, StatsSnapshot, StatsWatch, SubscribeSpec, SubscriptionStream,
    checks,
};

use super::background::POLL;
use super::conn::unavailable;
use super::keys::{QueueKeys, TopicKeys};
use super::queue::WaitingNote;
use super::{RedisCommit, RedisEngine};

/// How many queues' or topics' counts a Stats call reads at once: a broker of thousands
/// of queues answers in tens of round trips' time rather than thousands, without one
/// Stats call flooding Redis.
const STATS_IN_FLIGHT: usize = 32;

/// The counts (`count`) of each of `names` that `wanted` keeps, with its name, in name
/// order: one call per name, [`STATS_IN_FLIGHT`] at a time (on a cluster they go to their
/// own shards side by side). A name deleted meanwhile (NOT_FOUND) is left out.
async fn counts_of<T, Fut>(
    names: Vec<String>,
    wanted: impl Fn(&str) -> bool,
    count: impl Fn(String) -> Fut,
) -> Result<Vec<(String, T)>, BrokerError>
where
    Fut: Future<Output = Result<T, BrokerError>>,
{
    let mut counted = futures::stream::iter(names.into_iter().filter(|n| wanted(n)))
        .map(|name| {
            let counting = count(name.clone());
            async move { (name, counting.await) }
        })
        .buffered(STATS_IN_FLIGHT);
    let mut out = Vec::new();
    while let Some((name, counts)) = counted.next().await {
        match counts {
            Ok(counts) => out.push((name, counts)),
            Err(BrokerError::NotFound(_)) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(out)
}

impl RedisEngine {
    /// A queue's policy and pause state, or NOT_FOUND naming `field`'s queue.
    async fn existing_queue(&self, name: &str) -> Result<(QueuePolicy, bool), BrokerError> {
        match self.inner.queues.info(name).await? {
            Some(info) => Ok(info),
            None => {
                self.forget_queue(name);
                Err(BrokerError::NotFound(format!(
                    "queue {name:?} does not exist"
                )))
            }
        }
    }

    /// Acks checked leases: all or nothing, which the engine can promise within one
    /// queue (one script). Leases of several queues are refused: on a cluster their
    /// queues live on different shards, where no script sees them together.
    pub(super) async fn ack_leases(
        &self,
        access: &Access,
        acks: Vec<(String, Option<Bytes>)>,
    ) -> Result<(), BrokerError> {
        let parsed = checks::acks(&self.inner.config.limits, access, acks)?;
        let queue = parsed[0].0.queue.clone();
        if let Some((other, _)) = parsed.iter().find(|(lease, _)| lease.queue != queue) {
            return Err(BrokerError::FailedPrecondition(format!(
                "acks name leases of queue {queue:?} and of queue {:?}: the Redis engine acks the leases of one queue at a time, all or nothing; send one Ack per queue",
                other.queue
            )));
        }
        let total = parsed.len();
        let results = self.inner.queues.ack(&queue, parsed).await?;
        let stale: Vec<String> = results
            .into_iter()
            .filter_map(|r| r.err().map(|e| e.to_string()))
            .collect();
        if !stale.is_empty() {
            return Err(checks::stale_acks(&stale, total));
        }
        self.queue_durable(&queue).await
    }

    /// Moves the dead letters of `queue` on to their dead-letter queues now rather than
    /// at the next sweep (which retries whatever this could not move).
    pub(super) async fn route_dead_letters(&self, queue: &str) {
        if let Err(e) = self.inner.queues.move_dead_letters(queue).await {
            tracing::debug!(queue, error = %e, "dead letters wait for the next sweep");
        }
    }

    fn info(name: &str, (policy, paused): (QueuePolicy, bool)) -> QueueInfo {
        QueueInfo {
            name: name.to_owned(),
            policy,
            paused,
        }
    }

    /// The queues a job is looked for in: `queue`, or every queue.
    async fn queues_to_search(&self, queue: Option<&str>) -> Result<Vec<String>, BrokerError> {
        match queue {
            Some(name) => {
                self.existing_queue(name).await?;
                Ok(vec![name.to_owned()])
            }
            None => self.inner.queues.names().await,
        }
    }
}

impl Engine for RedisEngine {
    type Commit = RedisCommit;

    fn limits(&self) -> &Limits {
        &self.inner.config.limits
    }

    fn shutdown_token(&self) -> CancellationToken {
        self.inner.shutdown.clone()
    }

    fn storage_failure(&self) -> Option<String> {
        // Redis being unreachable is refused per request (UNAVAILABLE) and heals by
        // itself; nothing makes this node stop for good.
        None
    }

    async fn storage_failed(&self) -> String {
        std::future::pending().await
    }

    fn close(&self) {
        self.shutdown();
    }

    async fn publish_logged(
        &self,
        topic: &str,
        messages: Vec<NewMessage>,
    ) -> Result<Logged<Vec<Appended>, RedisCommit>, BrokerError> {
        checks::publish(&self.inner.config.limits, topic, &messages)?;
        let target = SchemaTarget::topic(topic);
        let value = self
            .inner
            .schemas
            .with_current(&target, |schema| {
                let checked = schema.check(
                    &target,
                    "messages",
                    messages.iter().map(|m| (&m.payload[..], &m.headers)),
                );
                let (topics, messages) = (&self.inner.topics, &messages);
                async move {
                    checked?;
                    topics
                        .publish_checked(topic, messages, schema.revision)
                        .await
                }
            })
            .await?;
        self.pump_published(topic).await?;
        let commit = RedisCommit(
            (self.inner.config.replicas > 0).then(|| TopicKeys::new(topic).base().to_owned()),
        );
        Ok(Logged { value, commit })
    }

    async fn enqueue_logged(
        &self,
        queue: &str,
        jobs: impl ExactSizeIterator<Item = Result<NewJob, BrokerError>> + Send,
        _now: Millis,
    ) -> Result<Logged<Vec<Enqueued>, RedisCommit>, BrokerError> {
        let jobs = checks::enqueue(&self.inner.config.limits, queue, jobs)?;
        // A queue this node knew may be gone when the script runs: deleted by another
        // node, or lost with Redis's data. Nothing was stored then, so it is created again
        // (as on a first use, which a later Enqueue would be anyway) and the jobs go once
        // more. Gone again at once, it is a delete racing this request, which is refused.
        let mut retried = false;
        let value = loop {
            let known = self.ensure_queue("queue", queue, false).await?;
            let target = SchemaTarget::queue(queue);
            let enqueued = self
                .inner
                .schemas
                .with_current(&target, |schema| {
                    let checked = schema.check(
                        &target,
                        "jobs",
                        jobs.iter().map(|j| (&j.payload[..], &j.headers)),
                    );
                    let (queues, jobs) = (&self.inner.queues, &jobs);
                    async move {
                        checked?;
                        queues.enqueue_checked(queue, jobs, schema.revision).await
                    }
                })
                .await;
            match enqueued {
                Err(BrokerError::NotFound(_)) if known && !retried => {
                    self.forget_queue(queue);
                    retried = true;
                }
                Err(BrokerError::NotFound(_)) => {
                    self.forget_queue(queue);
                    return Err(BrokerError::FailedPrecondition(format!(
                        "queue {queue:?} was deleted while this request was on its way; nothing was enqueued: send it again to enqueue into a new queue of that name"
                    )));
                }
                other => break other?,
            }
        };
        Ok(Logged {
            value,
            commit: self.queue_commit(queue),
        })
    }

    async fn confirm<T: Send>(&self, logged: Logged<T, RedisCommit>) -> Result<T, BrokerError> {
        self.durable(logged.commit).await?;
        Ok(logged.value)
    }

    async fn subscribe(
        &self,
        spec: SubscribeSpec,
        ends_on: CancellationToken,
    ) -> Result<SubscriptionStream, BrokerError> {
        let slot = self.subscription_slot(spec.pattern.as_str())?;
        let batches = super::subscription::subscribe(
            self.inner.topics.clone(),
            self.inner.wakes.clone(),
            spec,
            ends_on,
        )
        .await?;
        // The slot goes with the stream: given back when the stream is dropped.
        Ok(Box::pin(batches.map(move |batch| {
            let _held = &slot;
            batch
        })))
    }

    async fn create_topic(
        &self,
        name: &str,
        retention: Retention,
    ) -> Result<Retention, BrokerError> {
        validate_name("name", name)?;
        validate_retention(&retention)?;
        self.inner.topics.create(name, retention).await
    }

    async fn delete_topic(&self, name: &str) -> Result<(), BrokerError> {
        validate_name("name", name)?;
        self.inner.topics.delete(name).await
    }

    async fn lease(&self, queue: &str, params: LeaseParams) -> Result<Vec<Delivery>, BrokerError> {
        checks::batch(
            &self.inner.config.limits,
            "max_jobs",
            params.max_jobs,
            "jobs",
        )?;
        if let Some(v) = params.visibility_timeout_ms {
            checks::visibility("visibility_timeout_ms", v)?;
        }
        check_duration_ms("wait_ms", params.wait_ms, MAX_LEASE_WAIT_MS)?;
        self.ensure_queue("queue", queue, true).await?;
        let consumer = if params.consumer.is_empty() {
            params.address.as_str()
        } else {
            params.consumer.as_str()
        };
        let max = params.max_jobs.max(1);
        let give_up = tokio::time::Instant::now() + Duration::from_millis(params.wait_ms);
        let mut watch = None;
        let mut note = WaitingNote::new();
        loop {
            let leased = self
                .inner
                .queues
                .lease(
                    queue,
                    max,
                    params.visibility_timeout_ms,
                    consumer,
                    &params.address,
                )
                .await;
            let jobs = match leased {
                // Deleted by another node since this one saw it: Lease creates it again,
                // as on a first use.
                Err(BrokerError::NotFound(_)) => {
                    self.forget_queue(queue);
                    self.ensure_queue("queue", queue, true).await?;
                    continue;
                }
                other => other?,
            };
            let now = tokio::time::Instant::now();
            if !jobs.is_empty() || now >= give_up {
                return Ok(jobs);
            }
            // Armed and noted as waiting (renewed every poll), then one more look, so a job
            // enqueued between the look and the arming or the note is not missed; then
            // sleep until a wake-up, the poll or the end of the wait.
            if watch.is_none() {
                let channel = QueueKeys::new(queue).key("wake");
                watch = Some(self.inner.wakes.watch(&[channel]).await);
            }
            if note.due() {
                note.note(&self.inner.queues, queue).await?;
                continue;
            }
            let Some(watch) = watch.as_mut() else {
                continue;
            };
            // A delayed job or a lease due sooner than the poll: look again then (the
            // due time is Redis's clock, close enough to this node's for a nap).
            let mut nap = POLL.min(give_up - now);
            if let Some(due) = self.inner.queues.next_due(queue).await? {
                nap = nap.min(Duration::from_millis(due.saturating_sub(now_ms()).max(1)));
            }
            tokio::select! {
                _ = watch.wait(nap) => {}
                _ = self.inner.shutdown.cancelled() => return Ok(Vec::new()),
            }
        }
    }

    fn ack_as(
        &self,
        access: &Access,
        acks: Vec<(String, Option<Bytes>)>,
    ) -> impl Future<Output = Result<(), BrokerError>> + Send {
        self.ack_leases(access, acks)
    }

    async fn nack_as(
        &self,
        access: &Access,
        lease_id: &str,
        error: String,
        retry_delay_ms: Option<u64>,
        dead_letter: bool,
    ) -> Result<(JobState, Option<Millis>), BrokerError> {
        let lease = checks::authorized_lease(access, "lease_id", lease_id)?;
        checks::nack(&self.inner.config.limits, "", &error, retry_delay_ms)?;
        let outcome = self
            .inner
            .queues
            .nack(&lease, error, retry_delay_ms, dead_letter)
            .await?;
        self.queue_durable(&lease.queue).await?;
        if outcome.0 == JobState::Dead {
            self.route_dead_letters(&lease.queue).await;
        }
        Ok(outcome)
    }

    async fn extend_lease_as(
        &self,
        access: &Access,
        lease_id: &str,
        visibility_timeout_ms: u64,
    ) -> Result<Millis, BrokerError> {
        let lease: LeaseId = checks::authorized_lease(access, "lease_id", lease_id)?;
        checks::visibility("visibility_timeout_ms", visibility_timeout_ms)?;
        self.inner
            .queues
            .extend(&lease, visibility_timeout_ms)
            .await
    }

    fn consume(
        &self,
        spec: ConsumeSpec,
        commands: ConsumeCommandStream,
    ) -> impl Future<Output = Result<ConsumeStream, BrokerError>> + Send {
        self.open_consume(spec, commands)
    }

    async fn get_job(&self, id: &str, queue: Option<&str>) -> Result<(String, Job), BrokerError> {
        let uuid = checks::job_id("id", id)?;
        let mut found: Option<(String, Job)> = None;
        for name in self.queues_to_search(queue).await? {
            if let Some(job) = self.inner.queues.get(&name, &uuid).await? {
                // A dead job is reported from its original queue rather than from the
                // dead-letter queue that holds its copy.
                let better = match &found {
                    None => true,
                    Some((_, f)) => job.state == JobState::Dead && f.state != JobState::Dead,
                };
                if better {
                    found = Some((name, job));
                }
            }
        }
        found.ok_or_else(|| BrokerError::NotFound(format!("job {id} not found")))
    }

    async fn cancel_job(
        &self,
        id: &str,
        queue: Option<&str>,
    ) -> Result<(String, Job), BrokerError> {
        let uuid = checks::job_id("id", id)?;
        for name in self.queues_to_search(queue).await? {
            if self.inner.queues.get(&name, &uuid).await?.is_none() {
                continue;
            }
            let job = self.inner.queues.cancel(&name, &uuid).await?;
            self.queue_durable(&name).await?;
            return Ok((name, job));
        }
        Err(BrokerError::NotFound(format!("job {id} not found")))
    }

    async fn delete_job(&self, queue: &str, id: &str) -> Result<Job, BrokerError> {
        let uuid = checks::job_id("job_id", id)?;
        validate_name("queue", queue)?;
        let job = self.inner.queues.delete_job(queue, &uuid).await?;
        self.queue_durable(queue).await?;
        Ok(job)
    }

    async fn list_jobs(
        &self,
        queue: &str,
        state: Option<JobState>,
        page_size: usize,
        page_token: &str,
    ) -> Result<(Vec<Job>, Option<u64>), BrokerError> {
        checks::batch(&self.inner.config.limits, "page_size", page_size, "jobs")?;
        let after = checks::page_token(page_token)?;
        self.existing_queue(queue).await?;
        let size = if page_size == 0 { 100 } else { page_size };
        self.inner
            .queues
            .list(queue, state, size, (after > 0).then_some(after))
            .await
    }

    async fn job_history(&self, queue: &str, limit: usize) -> Result<Vec<Job>, BrokerError> {
        checks::batch(&self.inner.config.limits, "limit", limit, "jobs")?;
        self.existing_queue(queue).await?;
        self.inner
            .queues
            .history(queue, if limit == 0 { 100 } else { limit })
            .await
    }

    async fn create_queue(&self, name: &str, patch: PolicyPatch) -> Result<QueueInfo, BrokerError> {
        validate_name("name", name)?;
        let policy = patch.apply_to(name, QueuePolicy::default_for(name))?;
        checks::dead_letter_name("name", name, &policy.dead_letter_queue)?;
        self.creating_queues(async {
            if self.inner.queues.info(name).await?.is_some() {
                return Err(BrokerError::AlreadyExists(format!(
                    "queue {name:?} already exists (use UpdateQueue)"
                )));
            }
            let (existing, reserved) = self.queues_in_use().await?;
            self.check_queue_room(
                &existing,
                &reserved,
                "name",
                name,
                &policy.dead_letter_queue,
            )?;
            self.inner.queues.create(name, &policy).await
        })
        .await?;
        // The first pump starts the bindings at each topic's next message.
        self.pump(name, &policy.topic_bindings).await?;
        self.queue_durable(name).await?;
        Ok(Self::info(name, (policy, false)))
    }

    async fn update_queue(&self, name: &str, patch: PolicyPatch) -> Result<QueueInfo, BrokerError> {
        let (current, paused) = self.existing_queue(name).await?;
        let old = current.dead_letter_queue.clone();
        let policy = patch.apply_to(name, current)?;
        if old == policy.dead_letter_queue {
            self.inner.queues.set_policy(name, &policy).await?;
        } else {
            // A new dead-letter queue takes a place under --max-queues.
            self.creating_queues(async {
                self.check_dead_letter_room(&old, &policy.dead_letter_queue)
                    .await?;
                self.inner.queues.set_policy(name, &policy).await
            })
            .await?;
        }
        self.pump(name, &policy.topic_bindings).await?;
        self.queue_durable(name).await?;
        Ok(Self::info(name, (policy, paused)))
    }

    async fn purge_queue(&self, name: &str) -> Result<u64, BrokerError> {
        self.existing_queue(name).await?;
        let purged = self.inner.queues.purge(name).await?;
        self.queue_durable(name).await?;
        Ok(purged)
    }

    async fn delete_queue(&self, name: &str) -> Result<(), BrokerError> {
        validate_name("name", name)?;
        self.forget_queue(name);
        self.inner.queues.delete(name).await?;
        self.queue_durable(name).await
    }

    async fn set_paused(&self, name: &str, paused: bool) -> Result<QueueInfo, BrokerError> {
        let (policy, _) = self.existing_queue(name).await?;
        self.inner.queues.set_paused(name, paused).await?;
        self.queue_durable(name).await?;
        Ok(Self::info(name, (policy, paused)))
    }

    async fn list_queues(&self) -> Result<Vec<QueueInfo>, BrokerError> {
        let mut out = Vec::new();
        for name in self.inner.queues.names().await? {
            // Deleted since the catalog was read: not listed.
            if let Some(info) = self.inner.queues.info(&name).await? {
                out.push(Self::info(&name, info));
            }
        }
        Ok(out)
    }

    async fn redrive(
        &self,
        dead_letter_queue: &str,
        ids: &[String],
        rate_per_second: u32,
        max_jobs: u64,
        access: &Access,
    ) -> Result<RedriveOutcome, BrokerError> {
        self.redrive_dead_letters(dead_letter_queue, ids, rate_per_second, max_jobs, access)
            .await
    }

    async fn list_consumers(
        &self,
        queue: &str,
    ) -> Result<Vec<(Arc<str>, ConsumerState)>, BrokerError> {
        self.existing_queue(queue).await?;
        self.inner.queues.consumers(queue).await
    }

    async fn stats(
        &self,
        queues: &[String],
        topics: &[String],
    ) -> Result<StatsSnapshot, BrokerError> {
        let named =
            |names: &[String], name: &str| names.is_empty() || names.iter().any(|n| n == name);
        let mut snapshot = StatsSnapshot {
            taken_at: now_ms(),
            storage: StorageStatus {
                engine: "redis",
                fsync: Some(format!("replicas={}", self.inner.config.replicas)),
                failure: None,
                recovery: Default::default(),
            },
            ..StatsSnapshot::default()
        };
        // The memory figures are Redis's own (README, "The Redis engine"): what the
        // primaries use and their `maxmemory`, the limit that refuses writes here.
        // (A node needs INFO already: it reads `INFO server` and `INFO cluster` to connect.)
        let memory = self
            .inner
            .conn
            .clone()
            .memory()
            .await
            .map_err(|e| unavailable("reading Redis's memory (INFO memory)", e))?;
        snapshot.memory_used_bytes = memory.used_bytes;
        snapshot.memory_budget_bytes = memory.limit_bytes;
        let names = self.inner.queues.names().await?;
        snapshot.queues = counts_of(
            names,
            |n| named(queues, n),
            |name| async move { self.inner.queues.counts(&name).await },
        )
        .await?;
        let names = self.inner.topics.names().await?;
        snapshot.topics = counts_of(
            names,
            |n| named(topics, n),
            |name| async move { self.inner.topics.counts(&name).await },
        )
        .await?
        .into_iter()
        .map(|(_, counts)| counts)
        .collect();
        Ok(snapshot)
    }

    fn recent_stats(&self) -> Option<Arc<StatsSnapshot>> {
        self.inner.stats.recent()
    }

    fn watch_stats(&self) -> StatsWatch {
        self.inner.stats.watch(|| {
            let engine = self.clone();
            tokio::spawn(async move {
                let shutdown = engine.inner.shutdown.clone();
                engine
                    .inner
                    .stats
                    .publish(shutdown, || {
                        let engine = engine.clone();
                        async move { engine.stats(&[], &[]).await.ok() }
                    })
                    .await;
            });
        })
    }

    fn install_observer(&self, make: impl FnOnce() -> Arc<dyn Observer>) -> Arc<dyn Observer> {
        self.inner.observer.get_or_init(make).clone()
    }

    // Schedules take Redis's clock, not the request's (see `schedule.rs`).

    async fn create_schedule(
        &self,
        spec: ScheduleSpec,
        _now: Millis,
    ) -> Result<Schedule, BrokerError> {
        let now = self.redis_now().await?;
        self.create_schedule_at(spec, now).await
    }

    async fn update_schedule(
        &self,
        spec: ScheduleSpec,
        _now: Millis,
    ) -> Result<Schedule, BrokerError> {
        spec.validate(&self.inner.config.limits)?;
        self.check_template_schema(&spec.template).await?;
        let now = self.redis_now().await?;
        let name = spec.name.clone();
        self.change_schedule(&name, |s| s.redefine(spec.clone(), now))
            .await
    }

    fn delete_schedule(
        &self,
        name: &str,
        _now: Millis,
    ) -> impl Future<Output = Result<(), BrokerError>> + Send {
        self.delete_schedule_named(name)
    }

    async fn set_schedule_paused(
        &self,
        name: &str,
        paused: bool,
        _now: Millis,
    ) -> Result<Schedule, BrokerError> {
        let now = self.redis_now().await?;
        self.change_schedule(name, |s| {
            s.set_paused(paused, now);
            Ok(())
        })
        .await
    }

    fn get_schedule(
        &self,
        name: &str,
    ) -> impl Future<Output = Result<Schedule, BrokerError>> + Send {
        self.read_schedule(name)
    }

    fn list_schedules(&self) -> impl Future<Output = Result<Vec<Schedule>, BrokerError>> + Send {
        self.all_schedules()
    }

    async fn set_schema(
        &self,
        target: &SchemaTarget,
        definition: SchemaDefinition,
    ) -> Result<(u32, bool), BrokerError> {
        self.inner.schemas.set(target, definition).await
    }

    async fn get_schema(&self, target: &SchemaTarget) -> Result<SchemaHistory, BrokerError> {
        self.inner.schemas.get(target).await
    }

    async fn delete_schema(&self, target: &SchemaTarget) -> Result<u32, BrokerError> {
        self.inner.schemas.delete(target).await
    }

    async fn schema_revisions(&self) -> Result<HashMap<SchemaTarget, u32>, BrokerError> {
        self.inner.schemas.revisions().await
    }
}
