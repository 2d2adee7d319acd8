//! Recurring schedules: a named job template enqueued on a cron expression (in an IANA
//! time zone) or a fixed interval, exactly once per due tick.
//!
//! Everything here is pure and takes `now`: when the next tick comes ([`Schedule::next_after`]),
//! what to do at `now` ([`Schedule::plan`]: fire a tick, skip it as missed or as overlapping,
//! or wait), and the state after doing it ([`Schedule::record`]). The engines own the
//! atomicity: the job of a fired tick and the schedule's new `last_fire_ms` are written in
//! one step (one WAL entry, or one Redis script), and a tick at or before `last_fire_ms` is
//! never fired, so a tick never gets two jobs.

use std::collections::{BTreeMap, BTreeSet};
use std::str::FromStr;

use bytes::Bytes;
use chrono::{DateTime, SecondsFormat, TimeZone, Utc};
use chrono_tz::Tz;
use croner::Cron;
use croner::parser::{CronParser, Seconds};
use uuid::Uuid;

use crate::broker::domain::error::BrokerError;
use crate::broker::domain::limits::{Headers, Limits};
use crate::broker::domain::names::validate_name;
use crate::broker::domain::queue::NewJob;
use crate::broker::domain::time::Millis;

/// How late a tick may be handled and still count as on time: a tick older than this at
/// the moment the scheduler looks is *missed* (the broker was down, paused by a long GC,
/// or every node was busy), and the schedule's [`MissedTicks`] policy decides. Long
/// enough for a restart or a sweep on a loaded node, short enough that a `skip` schedule
/// does not run work meant for a minute ago.
pub(crate) const MISSED_GRACE_MS: Millis = 5_000;
/// Shortest interval of an interval schedule: the schedulers look once a tick (10 ms
/// locally, the sweep on Redis), and one fire per second per schedule is plenty.
pub(crate) const MIN_INTERVAL_MS: u64 = 1_000;
/// Longest interval: 366 days (a yearly job is a cron schedule).
pub(crate) const MAX_INTERVAL_MS: u64 = 366 * 24 * 3600 * 1000;
/// Longest schedule name: short enough that its idempotency key
/// (`schedule:<name>:<tick ms>`) fits a key limit of 255 bytes.
pub(crate) const MAX_SCHEDULE_NAME_BYTES: usize = 200;
/// Most schedules a broker keeps.
pub(crate) const MAX_SCHEDULES: usize = 10_000;
/// Longest cron expression, in bytes.
const MAX_CRON_BYTES: usize = 256;
/// Header naming the schedule on every job it enqueues (in the broker's reserved
/// `x-sluice-` namespace, so a producer cannot forge it).
pub(crate) const HEADER_SCHEDULE: &str = "x-sluice-schedule";
/// Header holding the tick a job was enqueued for, RFC 3339 UTC with milliseconds.
pub(crate) const HEADER_SCHEDULE_TICK: &str = "x-sluice-schedule-tick";

/// When a schedule fires.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Trigger {
    /// A cron expression (5 fields, or 6 with seconds first), evaluated in `tz`.
    Cron {
        /// The expression as given.
        expr: String,
        /// An IANA time zone name, e.g. `Europe/Paris` (`UTC` when empty in the request).
        tz: String,
    },
    /// Every `every_ms`, counted from the schedule's anchor (its creation, or the update
    /// that set the interval).
    Interval {
        /// The period.
        every_ms: u64,
    },
}

/// What to do with ticks that came due while nobody could fire them (see [`MISSED_GRACE_MS`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MissedTicks {
    /// Enqueue one job, for the most recent missed tick.
    #[default]
    RunOnce,
    /// Enqueue nothing; wait for the next tick.
    Skip,
}

/// What to do with a tick while the previous tick's job has not finished.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Overlap {
    /// Enqueue anyway.
    #[default]
    Allow,
    /// Skip the tick while the previous job is pending, scheduled, leased or retrying.
    Skip,
}

/// The job a schedule enqueues at each tick.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct JobTemplate {
    /// The target queue (created with default policies if it does not exist).
    pub queue: String,
    /// Job type.
    pub kind: String,
    /// Body.
    pub payload: Bytes,
    /// Headers (the broker adds [`HEADER_SCHEDULE`] and [`HEADER_SCHEDULE_TICK`]).
    pub headers: Headers,
    /// 0..=9.
    pub priority: u8,
}

/// What a user sets on a schedule (CreateSchedule, UpdateSchedule).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScheduleSpec {
    /// Unique name.
    pub name: String,
    /// When it fires.
    pub trigger: Trigger,
    /// What it enqueues.
    pub template: JobTemplate,
    /// Missed-tick policy.
    pub missed: MissedTicks,
    /// Overlap policy.
    pub overlap: Overlap,
    /// Created paused (Create only; Update keeps the paused flag).
    pub paused: bool,
}

/// A schedule's progress: what changes when it fires or skips.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RunState {
    /// The last tick handled (fired, or skipped): no tick at or before it ever fires.
    pub last_fire_ms: Option<Millis>,
    /// The next tick to look at (`None` when the trigger has no more ticks).
    pub next_fire_ms: Option<Millis>,
    /// The job of the last fired tick.
    pub last_job_id: Option<Uuid>,
    /// Ticks that enqueued a job.
    pub fired: u64,
    /// Catch-ups that skipped missed ticks (policy `skip`): one per catch-up, however
    /// many ticks were missed before it.
    pub skipped_missed: u64,
    /// Ticks skipped because the previous job was still running (overlap `skip`).
    pub skipped_overlap: u64,
}

/// A schedule as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Schedule {
    /// What the user set.
    pub spec: ScheduleSpec,
    /// Whether firing is paused.
    pub paused: bool,
    /// Interval schedules tick at `anchor_ms + k * every_ms`.
    pub anchor_ms: Millis,
    /// Creation time.
    pub created_ms: Millis,
    /// Bumped by every change (definition, pause, fire, skip): a Redis node's fire applies
    /// only if the schedule is still the revision it planned from.
    pub revision: u64,
    /// Progress.
    pub state: RunState,
}

/// What the scheduler does with a schedule at `now`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Decision {
    /// Nothing is due before `next`.
    Wait,
    /// Enqueue the job of `tick`; then look again at `next`.
    Fire {
        /// The tick the job is for.
        tick: Millis,
        /// The tick after `now`.
        next: Option<Millis>,
    },
    /// `tick` (the latest due) was missed and the policy is `skip`.
    SkipMissed {
        /// The tick not run.
        tick: Millis,
        /// The tick after `now`.
        next: Option<Millis>,
    },
    /// `tick` is skipped because the previous tick's job is still running.
    SkipOverlap {
        /// The tick not run.
        tick: Millis,
        /// The tick after `now`.
        next: Option<Millis>,
    },
    /// The due tick was handled already (the clock went back): only move on to `next`.
    Advance {
        /// The tick after `now`.
        next: Option<Millis>,
    },
}

fn parser() -> CronParser {
    CronParser::builder().seconds(Seconds::Optional).build()
}

fn parse_tz(field: &str, tz: &str) -> Result<Tz, BrokerError> {
    Tz::from_str(tz).map_err(|_| {
        BrokerError::invalid(
            field,
            format!("{tz:?} is not an IANA time zone (e.g. \"UTC\", \"Europe/Paris\")"),
        )
    })
}

fn to_millis<T: TimeZone>(t: &DateTime<T>) -> Option<Millis> {
    u64::try_from(t.timestamp_millis()).ok()
}

fn zoned(tz: Tz, t: Millis) -> Option<DateTime<Tz>> {
    let ms = i64::try_from(t).ok()?;
    Utc.timestamp_millis_opt(ms)
        .single()
        .map(|u| u.with_timezone(&tz))
}

/// A tick as the job's header shows it: RFC 3339 in UTC with milliseconds.
pub(crate) fn tick_rfc3339(tick: Millis) -> String {
    i64::try_from(tick)
        .ok()
        .and_then(|ms| Utc.timestamp_millis_opt(ms).single())
        .map(|t| t.to_rfc3339_opts(SecondsFormat::Millis, true))
        .unwrap_or_default()
}

/// The idempotency key of a tick's job.
pub(crate) fn tick_key(name: &str, tick: Millis) -> String {
    format!("schedule:{name}:{tick}")
}

impl Trigger {
    /// Checks the trigger; a refusal names the request field (`cron.expression`,
    /// `cron.time_zone` or `interval_ms`) and the value.
    pub(crate) fn validate(&self) -> Result<(), BrokerError> {
        match self {
            Trigger::Cron { expr, tz } => {
                if expr.len() > MAX_CRON_BYTES {
                    return Err(BrokerError::over_limit(
                        "cron.expression",
                        expr.len() as u64,
                        MAX_CRON_BYTES as u64,
                        "bytes",
                    ));
                }
                let cron = parser().parse(expr).map_err(|e| {
                    BrokerError::invalid(
                        "cron.expression",
                        format!("{expr:?} is not a cron expression: {e}"),
                    )
                })?;
                let tz = parse_tz("cron.time_zone", tz)?;
                // A pattern that never matches (31 February) would leave the schedule idle
                // forever: refuse it now.
                let start = zoned(tz, 0).expect("the epoch is a valid time");
                if cron.find_next_occurrence(&start, false).is_err() {
                    return Err(BrokerError::invalid(
                        "cron.expression",
                        format!("{expr:?} never matches a date"),
                    ));
                }
                Ok(())
            }
            Trigger::Interval { every_ms } => {
                if *every_ms < MIN_INTERVAL_MS || *every_ms > MAX_INTERVAL_MS {
                    return Err(BrokerError::invalid(
                        "interval_ms",
                        format!(
                            "{every_ms} ms is outside {MIN_INTERVAL_MS}..={MAX_INTERVAL_MS} ms"
                        ),
                    ));
                }
                Ok(())
            }
        }
    }
}

impl ScheduleSpec {
    /// Checks every field against `limits`, naming the field and the value on refusal.
    pub(crate) fn validate(&self, limits: &Limits) -> Result<(), BrokerError> {
        validate_name("name", &self.name)?;
        if self.name.len() > MAX_SCHEDULE_NAME_BYTES {
            return Err(BrokerError::over_limit(
                "name",
                self.name.len() as u64,
                MAX_SCHEDULE_NAME_BYTES as u64,
                "bytes",
            ));
        }
        self.trigger.validate()?;
        let t = &self.template;
        validate_name("job.queue", &t.queue)?;
        if t.priority > 9 {
            return Err(BrokerError::over_limit(
                "job.priority",
                u64::from(t.priority),
                9,
                "",
            ));
        }
        limits.check_entry(
            |f| format!("job.{f}"),
            t.payload.len(),
            &t.headers,
            &[("kind", Some(&t.kind))],
        )?;
        limits.check_key("name", &tick_key(&self.name, u64::MAX))
    }
}

impl Schedule {
    /// A new schedule created at `now`; its first tick is the first after `now`.
    pub(crate) fn new(spec: ScheduleSpec, now: Millis) -> Self {
        let paused = spec.paused;
        let mut s = Self {
            spec,
            paused,
            anchor_ms: now,
            created_ms: now,
            revision: 1,
            state: RunState::default(),
        };
        s.state.next_fire_ms = s.next_after(now);
        s
    }

    /// The schedule's name.
    pub(crate) fn name(&self) -> &str {
        &self.spec.name
    }

    /// The first tick strictly after `t` (`None`: the trigger has none left).
    pub(crate) fn next_after(&self, t: Millis) -> Option<Millis> {
        match &self.spec.trigger {
            Trigger::Interval { every_ms } => {
                let every = (*every_ms).max(1);
                if t < self.anchor_ms {
                    return Some(self.anchor_ms);
                }
                let k = (t - self.anchor_ms) / every + 1;
                self.anchor_ms.checked_add(k.checked_mul(every)?)
            }
            Trigger::Cron { expr, tz } => {
                let cron: Cron = parser().parse(expr).ok()?;
                let tz = Tz::from_str(tz).ok()?;
                let next = cron.find_next_occurrence(&zoned(tz, t)?, false).ok()?;
                to_millis(&next)
            }
        }
    }

    /// The latest tick at or before `t` (`None`: none since the anchor).
    pub(crate) fn latest_at(&self, t: Millis) -> Option<Millis> {
        match &self.spec.trigger {
            Trigger::Interval { every_ms } => {
                let every = (*every_ms).max(1);
                let k = t.checked_sub(self.anchor_ms)? / every;
                (k > 0).then(|| self.anchor_ms + k * every)
            }
            Trigger::Cron { expr, tz } => {
                let cron: Cron = parser().parse(expr).ok()?;
                let tz = Tz::from_str(tz).ok()?;
                let prev = cron.find_previous_occurrence(&zoned(tz, t)?, true).ok()?;
                to_millis(&prev)
            }
        }
    }

    /// What to do at `now`. `previous_running` says whether the job of the last fired
    /// tick is still pending, scheduled, leased or retrying (only read with overlap
    /// `skip`).
    pub(crate) fn plan(&self, now: Millis, previous_running: bool) -> Decision {
        if self.paused {
            return Decision::Wait;
        }
        let Some(due) = self.state.next_fire_ms else {
            return Decision::Wait;
        };
        if due > now {
            return Decision::Wait;
        }
        let next = self.next_after(now);
        // The latest due tick: ticks before it are missed whatever their age (a newer
        // one is due), and it is missed itself when older than the grace.
        let tick = self.latest_at(now).unwrap_or(due).max(due);
        if self.state.last_fire_ms.is_some_and(|last| tick <= last) {
            return Decision::Advance { next };
        }
        let missed = now.saturating_sub(tick) > MISSED_GRACE_MS;
        if missed && self.spec.missed == MissedTicks::Skip {
            return Decision::SkipMissed { tick, next };
        }
        if previous_running
            && self.spec.overlap == Overlap::Skip
            && self.state.last_job_id.is_some()
        {
            return Decision::SkipOverlap { tick, next };
        }
        Decision::Fire { tick, next }
    }

    /// The job of `tick`: the template, with the schedule and tick headers and the tick's
    /// idempotency key (so even a second attempt at the same tick is deduplicated by the
    /// queue while its dedup window lasts).
    pub(crate) fn job_for(&self, tick: Millis) -> NewJob {
        let t = &self.spec.template;
        let mut headers = t.headers.clone();
        headers.insert(HEADER_SCHEDULE.to_owned(), self.spec.name.clone());
        headers.insert(HEADER_SCHEDULE_TICK.to_owned(), tick_rfc3339(tick));
        NewJob {
            payload: t.payload.clone(),
            headers,
            kind: t.kind.clone(),
            priority: t.priority,
            run_at: None,
            max_attempts: None,
            idempotency_key: Some(tick_key(&self.spec.name, tick)),
            ordering_key: None,
        }
    }

    /// Applies a decision (after its job, if any, was enqueued as `job`).
    pub(crate) fn record(&mut self, decision: Decision, job: Option<Uuid>) {
        let next = match decision {
            Decision::Wait => return,
            Decision::Fire { tick, next } => {
                self.state.last_fire_ms = Some(tick);
                self.state.fired += 1;
                if job.is_some() {
                    self.state.last_job_id = job;
                }
                next
            }
            Decision::SkipMissed { tick, next } => {
                self.state.last_fire_ms = Some(tick);
                self.state.skipped_missed += 1;
                next
            }
            Decision::SkipOverlap { tick, next } => {
                self.state.last_fire_ms = Some(tick);
                self.state.skipped_overlap += 1;
                next
            }
            Decision::Advance { next } => next,
        };
        self.state.next_fire_ms = next;
        self.revision += 1;
    }

    /// Replaces the definition at `now` (UpdateSchedule), keeping progress and the paused
    /// flag. A new trigger re-anchors and starts at its first tick after `now`; a new
    /// template alone keeps the tick the schedule was waiting for.
    pub(crate) fn redefine(&mut self, spec: ScheduleSpec, now: Millis) -> Result<(), BrokerError> {
        if spec.template.queue != self.spec.template.queue {
            return Err(BrokerError::FailedPrecondition(format!(
                "job.queue: schedule {:?} enqueues to queue {:?}, and a schedule's queue cannot change (it keeps its state beside the queue's jobs); delete the schedule and create it again for queue {:?}",
                self.spec.name, self.spec.template.queue, spec.template.queue
            )));
        }
        let retrigger = spec.trigger != self.spec.trigger;
        self.spec = ScheduleSpec {
            paused: self.paused,
            ..spec
        };
        if retrigger {
            self.anchor_ms = now;
            self.state.next_fire_ms = self.next_after(now);
        }
        self.revision += 1;
        Ok(())
    }

    /// Pauses or resumes at `now`. A resumed schedule starts at its first tick after
    /// `now`: ticks that came due while it was paused are not run (pausing is asking for
    /// that), whatever the missed-tick policy.
    pub(crate) fn set_paused(&mut self, paused: bool, now: Millis) {
        if self.paused == paused {
            return;
        }
        self.paused = paused;
        if !paused {
            self.state.next_fire_ms = self.next_after(now);
        }
        self.revision += 1;
    }
}

/// Every schedule of a broker, by name, with an index by next tick so the scheduler
/// looks only at the due ones (never a scan of all of them per tick).
#[derive(Debug, Default)]
pub(crate) struct ScheduleBook {
    by_name: BTreeMap<String, Schedule>,
    /// `(next_fire_ms, name)` of every unpaused schedule with a next tick.
    by_next: BTreeSet<(Millis, String)>,
}

impl ScheduleBook {
    fn index_key(s: &Schedule) -> Option<(Millis, String)> {
        match (s.paused, s.state.next_fire_ms) {
            (false, Some(t)) => Some((t, s.spec.name.clone())),
            _ => None,
        }
    }

    /// Inserts or replaces a schedule.
    pub(crate) fn put(&mut self, schedule: Schedule) {
        self.remove(schedule.name());
        if let Some(k) = Self::index_key(&schedule) {
            self.by_next.insert(k);
        }
        self.by_name.insert(schedule.spec.name.clone(), schedule);
    }

    /// Removes a schedule; returns it.
    pub(crate) fn remove(&mut self, name: &str) -> Option<Schedule> {
        let old = self.by_name.remove(name)?;
        if let Some(k) = Self::index_key(&old) {
            self.by_next.remove(&k);
        }
        Some(old)
    }

    /// A schedule by name.
    pub(crate) fn get(&self, name: &str) -> Option<&Schedule> {
        self.by_name.get(name)
    }

    /// Changes a schedule through `f`, keeping the index right.
    pub(crate) fn update<R>(
        &mut self,
        name: &str,
        f: impl FnOnce(&mut Schedule) -> R,
    ) -> Option<R> {
        let mut s = self.remove(name)?;
        let r = f(&mut s);
        self.put(s);
        Some(r)
    }

    /// How many schedules there are.
    pub(crate) fn len(&self) -> usize {
        self.by_name.len()
    }

    /// Every schedule, by name.
    pub(crate) fn all(&self) -> impl Iterator<Item = &Schedule> {
        self.by_name.values()
    }

    /// The names of the schedules due at `now`, earliest first.
    pub(crate) fn due(&self, now: Millis) -> Vec<String> {
        self.by_next
            .range(..(now.saturating_add(1), String::new()))
            .map(|(_, n)| n.clone())
            .collect()
    }

    /// The earliest next tick of any unpaused schedule.
    pub(crate) fn next_due(&self) -> Option<Millis> {
        self.by_next.first().map(|(t, _)| *t)
    }
}

#[cfg(test)]
mod tests;
