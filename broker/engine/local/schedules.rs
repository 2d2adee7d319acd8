//! Recurring schedules in the in-process engine: the definitions (create, update, delete,
//! pause, resume, list) and the scheduler the expiry ticker runs.
//!
//! Exactly once per tick: a fire takes the schedule book's lock, then the target queue's
//! (always in that order), enqueues the tick's job and records the schedule's new progress
//! in the *same* log batch, so one WAL entry holds both (a crash keeps both or neither,
//! and a tick whose entry was lost is due again at restart). The domain never fires a tick
//! at or before the recorded last fire.

use std::collections::HashMap;

use uuid::Uuid;

use crate::broker::domain::error::BrokerError;
use crate::broker::domain::schedule::{
    Decision, JobTemplate, MAX_SCHEDULES, Schedule, ScheduleBook, ScheduleSpec,
};
use crate::broker::domain::schema::TargetKind;
use crate::broker::domain::time::Millis;
use crate::broker::sync::lock;

use super::Broker;
use super::queues::enqueue_recording;

/// How long a schedule whose job could not be enqueued (its queue full, or no room for
/// the queue under `--max-queues`) waits before the scheduler tries the tick again.
const RETRY_AFTER_FAILURE_MS: Millis = 1_000;

/// The schedules and the scheduler's own bookkeeping, behind one std mutex.
#[derive(Default)]
pub(crate) struct Schedules {
    pub(crate) book: ScheduleBook,
    /// Schedules whose last fire failed, and when to try again.
    retry_at: HashMap<String, Millis>,
}

fn not_found(name: &str) -> BrokerError {
    BrokerError::NotFound(format!("schedule {name:?} does not exist"))
}

impl Broker {
    /// Applies `change` to the schedule book and logs what it returns (the schedule to
    /// record whole, or `Err` to refuse and change nothing), then waits until durable.
    async fn change_schedule(
        &self,
        now: Millis,
        change: impl FnOnce(&mut ScheduleBook) -> Result<Option<Schedule>, BrokerError>,
        deleted: Option<&str>,
    ) -> Result<Option<Schedule>, BrokerError> {
        self.wait_for_log_space().await?;
        let (result, commit) = {
            let _change = self.begin()?;
            let mut schedules = lock(&self.inner.schedules);
            let result = change(&mut schedules.book)?;
            let mut batch = self.batch();
            if let Some(s) = &result {
                batch.schedule_def(s);
            }
            if let Some(name) = deleted {
                batch.schedule_delete(name);
                schedules.retry_at.remove(name);
            }
            (result, self.commit(batch, now))
        };
        self.durable(commit?).await?;
        Ok(result)
    }

    /// Creates a schedule.
    pub(crate) async fn create_schedule(
        &self,
        spec: ScheduleSpec,
        now: Millis,
    ) -> Result<Schedule, BrokerError> {
        spec.validate(self.limits())?;
        self.check_template_schema(&spec.template)?;
        self.ensure_schedule_queue(&spec.template.queue, now)?;
        let created = self
            .change_schedule(
                now,
                |book| {
                    if book.get(&spec.name).is_some() {
                        return Err(BrokerError::AlreadyExists(format!(
                            "schedule {:?} already exists",
                            spec.name
                        )));
                    }
                    if book.len() >= MAX_SCHEDULES {
                        return Err(BrokerError::ResourceExhausted(format!(
                            "name: {} schedules exist, the limit is {MAX_SCHEDULES}",
                            book.len()
                        )));
                    }
                    let s = Schedule::new(spec, now);
                    book.put(s.clone());
                    Ok(Some(s))
                },
                None,
            )
            .await?;
        Ok(created.expect("a created schedule"))
    }

    /// Makes the schedule's queue exist from the start (as an Enqueue would, and logged as
    /// a CreateQueue is), so a worker that waits on it before the first tick is not taken
    /// for one with a typo in its queue name.
    fn ensure_schedule_queue(&self, queue: &str, now: Millis) -> Result<(), BrokerError> {
        let _change = self.begin()?;
        if self.inner.queues.contains_key(queue) {
            return Ok(());
        }
        let slot = self.queue_or_create("job.queue", queue)?;
        let q = lock(&slot.queue);
        let mut batch = self.batch();
        batch.queue_def(&slot.name, q.policy(), q.is_paused());
        // Durable once the schedule's own record (appended after it) is: log positions
        // only grow.
        let _logged_before_the_schedule = self.commit(batch, now)?;
        Ok(())
    }

    /// Replaces a schedule's definition, keeping its progress.
    pub(crate) async fn update_schedule(
        &self,
        spec: ScheduleSpec,
        now: Millis,
    ) -> Result<Schedule, BrokerError> {
        spec.validate(self.limits())?;
        self.check_template_schema(&spec.template)?;
        let name = spec.name.clone();
        let updated = self
            .change_schedule(
                now,
                |book| {
                    let mut s = book.get(&name).cloned().ok_or_else(|| not_found(&name))?;
                    s.redefine(spec, now)?;
                    book.put(s.clone());
                    Ok(Some(s))
                },
                None,
            )
            .await?;
        Ok(updated.expect("an updated schedule"))
    }

    /// Pauses or resumes a schedule.
    pub(crate) async fn set_schedule_paused(
        &self,
        name: &str,
        paused: bool,
        now: Millis,
    ) -> Result<Schedule, BrokerError> {
        let changed = self
            .change_schedule(
                now,
                |book| {
                    book.update(name, |s| {
                        s.set_paused(paused, now);
                        s.clone()
                    })
                    .map(Some)
                    .ok_or_else(|| not_found(name))
                },
                None,
            )
            .await?;
        Ok(changed.expect("a changed schedule"))
    }

    /// Deletes a schedule.
    pub(crate) async fn delete_schedule(&self, name: &str, now: Millis) -> Result<(), BrokerError> {
        self.change_schedule(
            now,
            |book| {
                book.remove(name)
                    .map(|_| None)
                    .ok_or_else(|| not_found(name))
            },
            Some(name),
        )
        .await?;
        Ok(())
    }

    /// Every schedule, by name.
    pub(crate) fn list_schedules(&self) -> Vec<Schedule> {
        lock(&self.inner.schedules).book.all().cloned().collect()
    }

    /// One schedule.
    pub(crate) fn get_schedule(&self, name: &str) -> Result<Schedule, BrokerError> {
        lock(&self.inner.schedules)
            .book
            .get(name)
            .cloned()
            .ok_or_else(|| not_found(name))
    }

    /// Refuses a template whose payload fails its queue's schema, as an Enqueue would be.
    fn check_template_schema(&self, template: &JobTemplate) -> Result<(), BrokerError> {
        self.check_schema(
            TargetKind::Queue,
            &template.queue,
            "job",
            std::iter::once((&template.payload[..], &template.headers)),
        )
    }

    /// Fires (or skips) every schedule due at `now`; the expiry ticker calls it each tick.
    /// Looks only at due schedules (the book is ordered by next tick).
    pub(in crate::broker) fn run_due_schedules(&self, now: Millis) {
        let due = {
            let schedules = lock(&self.inner.schedules);
            if schedules.book.next_due().is_none_or(|t| t > now) {
                return;
            }
            schedules.book.due(now)
        };
        for name in due {
            // After a storage failure nothing changes any more (fail-stop).
            let Ok(_change) = self.begin() else { return };
            let mut schedules = lock(&self.inner.schedules);
            if schedules.retry_at.get(&name).is_some_and(|t| *t > now) {
                continue;
            }
            let Some(mut s) = schedules.book.get(&name).cloned() else {
                continue;
            };
            match self.fire(&mut s, now) {
                Ok(()) => {
                    schedules.retry_at.remove(&name);
                    schedules.book.put(s);
                }
                Err(e) => {
                    tracing::warn!(schedule = %name, error = %e, "a schedule's job could not be enqueued; trying again in {RETRY_AFTER_FAILURE_MS} ms");
                    schedules
                        .retry_at
                        .insert(name, now + RETRY_AFTER_FAILURE_MS);
                }
            }
        }
    }

    /// Plans `s` at `now` and applies the decision in its queue: the job (if any) and the
    /// schedule's progress go into one log batch, appended under the queue's lock.
    fn fire(&self, s: &mut Schedule, now: Millis) -> Result<(), BrokerError> {
        // The queue's schema may have changed since the schedule was made: a job that
        // fails it is not enqueued (the tick is tried again, as after a full queue).
        self.check_template_schema(&s.spec.template)?;
        let slot = self.queue_or_create("job.queue", &s.spec.template.queue)?;
        let (outcome, _commit) = self.with_queue(&slot, now, |q, batch| {
            let running = s
                .state
                .last_job_id
                .and_then(|id| q.get(&id))
                .is_some_and(|job| !job.state.is_finished());
            let decision = s.plan(now, running);
            if decision == Decision::Wait {
                return Ok(());
            }
            let job: Option<Uuid> = match decision {
                Decision::Fire { tick, .. } => {
                    let enqueued =
                        enqueue_recording(batch, &slot.name, q, now, vec![s.job_for(tick)])?;
                    enqueued.first().map(|e| e.id)
                }
                _ => None,
            };
            s.record(decision, job);
            batch.schedule_fired(s);
            Ok(())
        })?;
        // The ticker does not wait for the fsync: a crash before it loses the job and the
        // fire together, and the tick is due again after the restart.
        outcome
    }
}
