//! Recurring schedules on Redis: the catalog and the due index (in the catalog's slot),
//! the definitions (in the queue's slot, see `queue/schedule.rs`), and the scheduler
//! every node runs in its sweep.
//!
//! * `sluice:{sluice}:schedules` hash: schedule name -> its queue (names are unique).
//! * `sluice:{sluice}:schedule_next` sorted set: name scored by its next tick, for finding
//!   due schedules without reading them all. It is a hint, written after the schedule
//!   itself: a node that dies in between leaves a stale score, which the next look
//!   repairs from the schedule's own `next_fire`.
//!
//! Time is Redis's (`TIME`), as for every deadline of this engine: a schedule's anchor and
//! each plan read it, so nodes with skewed clocks agree on when a tick is due.
//!
//! Exactly once per tick across nodes: every node plans from the schedule as read, and
//! the fire script applies the plan only if the schedule is still at the revision read
//! (and never to a tick at or before the last fire), in the same script as the enqueue.

use crate::broker::domain::error::BrokerError;
use crate::broker::domain::schedule::{
    Decision, JobTemplate, MAX_SCHEDULES, Schedule, ScheduleSpec,
};
use crate::broker::domain::schema::SchemaTarget;
use crate::broker::domain::time::{Millis, now_ms};

use crate::broker::sync::lock;

use super::RedisEngine;
use super::conn::unavailable;
use super::keys::catalog;
use super::queue::schedule::FireOutcome;
use super::schema::Cached;

/// How far past this node's clock the sweep reads the due index before asking Redis's
/// clock: a node whose clock is further behind Redis's finds due ticks that much later
/// (the other nodes fire them meanwhile).
const CLOCK_MARGIN_MS: Millis = 1_000;

/// How long this node waits before trying a schedule whose fire failed again.
const RETRY_AFTER_FAILURE_MS: Millis = 1_000;

/// How many times a definition change is retried when a fire moved the schedule on
/// between its read and its write.
const PUT_ATTEMPTS: usize = 10;

fn not_found(name: &str) -> BrokerError {
    BrokerError::NotFound(format!("schedule {name:?} does not exist"))
}

impl RedisEngine {
    async fn schedule_queue(&self, name: &str) -> Result<Option<String>, BrokerError> {
        let mut c = self.inner.conn.clone();
        redis::cmd("HGET")
            .arg(catalog("schedules"))
            .arg(name)
            .query_async(&mut c)
            .await
            .map_err(|e| unavailable("reading the schedule catalog", e))
    }

    /// Puts `s`'s next tick in the due index (or takes it out when it has none).
    async fn index_schedule(&self, s: &Schedule) -> Result<(), BrokerError> {
        let mut c = self.inner.conn.clone();
        let cmd = match (s.paused, s.state.next_fire_ms) {
            (false, Some(t)) => {
                let mut cmd = redis::cmd("ZADD");
                cmd.arg(catalog("schedule_next")).arg(t).arg(&s.spec.name);
                cmd
            }
            _ => {
                let mut cmd = redis::cmd("ZREM");
                cmd.arg(catalog("schedule_next")).arg(&s.spec.name);
                cmd
            }
        };
        cmd.query_async::<()>(&mut c)
            .await
            .map_err(|e| unavailable("indexing a schedule", e))
    }

    /// Schedule `name` with its progress, or NOT_FOUND.
    pub(super) async fn read_schedule(&self, name: &str) -> Result<Schedule, BrokerError> {
        let queue = self
            .schedule_queue(name)
            .await?
            .ok_or_else(|| not_found(name))?;
        self.inner
            .queues
            .schedule_get(&queue, name)
            .await?
            .ok_or_else(|| not_found(name))
    }

    /// Creates a schedule: named in the catalog first (which keeps names unique), then
    /// written in its queue's slot. A catalog entry without a schedule (a node stopped
    /// between the two) is taken over.
    pub(super) async fn create_schedule_at(
        &self,
        spec: ScheduleSpec,
        now: Millis,
    ) -> Result<Schedule, BrokerError> {
        spec.validate(&self.inner.config.limits)?;
        self.check_template_schema(&spec.template).await?;
        // The queue exists from the start, as with the in-process engine.
        self.ensure_queue("job.queue", &spec.template.queue, false)
            .await?;
        let mut c = self.inner.conn.clone();
        let count: usize = redis::cmd("HLEN")
            .arg(catalog("schedules"))
            .query_async(&mut c)
            .await
            .map_err(|e| unavailable("counting schedules", e))?;
        if count >= MAX_SCHEDULES {
            return Err(BrokerError::ResourceExhausted(format!(
                "name: {count} schedules exist, the limit is {MAX_SCHEDULES}"
            )));
        }
        let added: i64 = redis::cmd("HSETNX")
            .arg(catalog("schedules"))
            .arg(&spec.name)
            .arg(&spec.template.queue)
            .query_async(&mut c)
            .await
            .map_err(|e| unavailable("naming a schedule in the catalog", e))?;
        let name = spec.name.clone();
        let exists = || BrokerError::AlreadyExists(format!("schedule {name:?} already exists"));
        if added == 0 {
            let queue = self.schedule_queue(&spec.name).await?;
            let half_made = match &queue {
                Some(q) => self
                    .inner
                    .queues
                    .schedule_get(q, &spec.name)
                    .await?
                    .is_none(),
                None => false,
            };
            if !half_made || queue.as_deref() != Some(spec.template.queue.as_str()) {
                return Err(exists());
            }
        }
        let s = Schedule::new(spec, now);
        if !self.inner.queues.schedule_put(&s, None).await? {
            return Err(exists());
        }
        self.index_schedule(&s).await?;
        self.queue_durable(&s.spec.template.queue).await?;
        Ok(s)
    }

    /// Reads schedule `name`, changes it with `change` and writes it back if nobody
    /// changed it meanwhile (else reads it again).
    pub(super) async fn change_schedule(
        &self,
        name: &str,
        mut change: impl FnMut(&mut Schedule) -> Result<(), BrokerError>,
    ) -> Result<Schedule, BrokerError> {
        for _ in 0..PUT_ATTEMPTS {
            let mut s = self.read_schedule(name).await?;
            let read = s.revision;
            change(&mut s)?;
            if self.inner.queues.schedule_put(&s, Some(read)).await? {
                self.index_schedule(&s).await?;
                self.queue_durable(&s.spec.template.queue).await?;
                return Ok(s);
            }
        }
        Err(BrokerError::Unavailable(format!(
            "schedule {name:?} kept changing under this request ({PUT_ATTEMPTS} attempts); nothing was changed, send it again"
        )))
    }

    /// Deletes a schedule: its state, its index entry, then its name.
    pub(super) async fn delete_schedule_named(&self, name: &str) -> Result<(), BrokerError> {
        let queue = self
            .schedule_queue(name)
            .await?
            .ok_or_else(|| not_found(name))?;
        self.inner.queues.schedule_delete(&queue, name).await?;
        let mut c = self.inner.conn.clone();
        redis::pipe()
            .cmd("ZREM")
            .arg(catalog("schedule_next"))
            .arg(name)
            .ignore()
            .cmd("HDEL")
            .arg(catalog("schedules"))
            .arg(name)
            .ignore()
            .query_async::<()>(&mut c)
            .await
            .map_err(|e| unavailable("deleting a schedule from the catalog", e))?;
        self.queue_durable(&queue).await
    }

    /// Every schedule, by name.
    pub(super) async fn all_schedules(&self) -> Result<Vec<Schedule>, BrokerError> {
        let mut c = self.inner.conn.clone();
        let mut names: Vec<(String, String)> = redis::cmd("HGETALL")
            .arg(catalog("schedules"))
            .query_async(&mut c)
            .await
            .map_err(|e| unavailable("listing schedules", e))?;
        names.sort();
        let mut out = Vec::with_capacity(names.len());
        for (name, queue) in names {
            if let Some(s) = self.inner.queues.schedule_get(&queue, &name).await? {
                out.push(s);
            }
        }
        Ok(out)
    }

    /// Redis's clock (`TIME`): ticks are planned on it, as every deadline of this engine
    /// is, so nodes with skewed clocks fire a tick at the same moment.
    pub(super) async fn redis_now(&self) -> Result<Millis, BrokerError> {
        let mut c = self.inner.conn.clone();
        let (secs, micros): (u64, u64) = redis::cmd("TIME")
            .query_async(&mut c)
            .await
            .map_err(|e| unavailable("reading Redis's clock", e))?;
        Ok(secs * 1000 + micros / 1000)
    }

    /// Fires (or skips) the schedules due now: reads only the due index's head, plans
    /// each due schedule, and lets the fire script decide which node's plan applies.
    pub(super) async fn run_due_schedules(&self) -> Result<(), BrokerError> {
        let mut c = self.inner.conn.clone();
        // The index is read up to this node's clock plus a margin, and Redis's clock is
        // asked only when something may be due: an idle sweep costs one command.
        let near: Vec<(String, f64)> = redis::cmd("ZRANGE")
            .arg(catalog("schedule_next"))
            .arg("-inf")
            .arg(now_ms().saturating_add(CLOCK_MARGIN_MS))
            .arg("BYSCORE")
            .arg("LIMIT")
            .arg(0)
            .arg(100)
            .arg("WITHSCORES")
            .query_async(&mut c)
            .await
            .map_err(|e| unavailable("reading due schedules", e))?;
        if near.is_empty() {
            return Ok(());
        }
        let now = self.redis_now().await?;
        let due = near
            .into_iter()
            .filter(|(_, at)| *at <= now as f64)
            .map(|(name, _)| name);
        for name in due {
            if self.inner.shutdown.is_cancelled() {
                return Ok(());
            }
            let s = match self.read_schedule(&name).await {
                Ok(s) => s,
                Err(BrokerError::NotFound(_)) => {
                    redis::cmd("ZREM")
                        .arg(catalog("schedule_next"))
                        .arg(&name)
                        .query_async::<()>(&mut c)
                        .await
                        .map_err(|e| unavailable("unindexing a schedule", e))?;
                    continue;
                }
                Err(e) => return Err(e),
            };
            if lock(&self.inner.schedule_retry)
                .get(&name)
                .is_some_and(|t| *t > now)
            {
                continue;
            }
            match self.fire_schedule(s, now).await {
                Ok(()) => {
                    lock(&self.inner.schedule_retry).remove(&name);
                }
                Err(e) => {
                    tracing::warn!(schedule = %name, error = %e, "a schedule's job could not be enqueued; trying again in {RETRY_AFTER_FAILURE_MS} ms");
                    lock(&self.inner.schedule_retry).insert(name, now + RETRY_AFTER_FAILURE_MS);
                }
            }
        }
        Ok(())
    }

    /// Refuses a template whose payload fails its queue's current schema (CreateSchedule,
    /// UpdateSchedule), as an Enqueue would be.
    pub(super) async fn check_template_schema(
        &self,
        template: &JobTemplate,
    ) -> Result<(), BrokerError> {
        let target = SchemaTarget::queue(&template.queue);
        self.inner
            .schemas
            .with_current(&target, |schema| {
                let checked = check_template(&schema, &target, template);
                async move { checked }
            })
            .await
    }

    async fn fire_schedule(&self, mut s: Schedule, now: Millis) -> Result<(), BrokerError> {
        // The overlap check is the script's (it reads the previous job where it lives).
        let decision = s.plan(now, false);
        if decision == Decision::Wait {
            // A stale index entry (its writer stopped before indexing): repair it.
            return self.index_schedule(&s).await;
        }
        let queue = s.spec.template.queue.clone();
        self.ensure_queue("job.queue", &queue, false).await?;
        let target = SchemaTarget::queue(&queue);
        let fired = self
            .inner
            .schemas
            .with_current(&target, |schema| {
                // The queue's schema may have changed since the schedule was made: a job
                // that fails it is not enqueued (the tick is tried again, as after a full
                // queue).
                let checked = check_template(&schema, &target, &s.spec.template);
                let (queues, s) = (&self.inner.queues, &s);
                async move {
                    checked?;
                    queues.schedule_fire(s, decision, schema.revision).await
                }
            })
            .await;
        let outcome = match fired {
            Err(BrokerError::NotFound(_)) => {
                // The queue was deleted since this node saw it: make it again next time.
                self.forget_queue(&queue);
                return Ok(());
            }
            other => other?,
        };
        if let FireOutcome::Applied(job) = outcome {
            s.record(decision, job);
            self.index_schedule(&s).await?;
        }
        Ok(())
    }
}

/// Refuses a template whose payload fails its queue's schema, as an Enqueue would be.
fn check_template(
    schema: &Cached,
    target: &SchemaTarget,
    template: &JobTemplate,
) -> Result<(), BrokerError> {
    schema.check(
        target,
        "job",
        std::iter::once((&template.payload[..], &template.headers)),
    )
}
