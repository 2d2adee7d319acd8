//! Recurring schedules: a typed [`ScheduleSpec`] builder and the [`Client`] calls that
//! manage schedules (each needs `admin` on the schedule's queue).

use std::time::Duration;

use bytes::Bytes;

use crate::pb;

use super::{Client, Result};

/// A schedule's definition, for [`Client::create_schedule`], [`Client::update_schedule`]
/// and [`Client::upsert_schedule`].
///
/// ```no_run
/// # async fn demo(client: sluice::client::Client) -> sluice::client::Result<()> {
/// use std::time::Duration;
/// use sluice::client::ScheduleSpec;
///
/// // Every hour on the hour, Paris time, into queue "reports".
/// client
///     .create_schedule(
///         ScheduleSpec::cron("0 * * * *", "Europe/Paris")
///             .name("hourly-report")
///             .queue("reports")
///             .kind("report")
///             .payload(r#"{"scope":"all"}"#)
///             .skip_missed_ticks(),
///     )
///     .await?;
/// // Every 30 s, never two runs at once.
/// client
///     .upsert_schedule(
///         ScheduleSpec::every(Duration::from_secs(30)).name("sweep").queue("maintenance").skip_overlap(),
///     )
///     .await?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct ScheduleSpec(pb::ScheduleSpec);

impl ScheduleSpec {
    fn with(trigger: pb::schedule_spec::Trigger) -> Self {
        Self(pb::ScheduleSpec {
            trigger: Some(trigger),
            job: Some(pb::ScheduleJob::default()),
            ..Default::default()
        })
    }

    fn job(&mut self) -> &mut pb::ScheduleJob {
        self.0.job.get_or_insert_with(Default::default)
    }

    /// Fires on a cron expression (5 fields, or 6 with seconds) read in an IANA time
    /// zone (`""` is UTC).
    pub fn cron(expression: impl Into<String>, time_zone: impl Into<String>) -> Self {
        Self::with(pb::schedule_spec::Trigger::Cron(pb::CronTrigger {
            expression: expression.into(),
            time_zone: time_zone.into(),
        }))
    }

    /// Fires every `period` (at least 1 s), counted from creation.
    pub fn every(period: Duration) -> Self {
        Self::with(pb::schedule_spec::Trigger::IntervalMs(
            period.as_millis().try_into().unwrap_or(u64::MAX),
        ))
    }

    /// Sets the schedule's unique name.
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.0.name = name.into();
        self
    }

    /// Sets the queue the jobs go to.
    pub fn queue(mut self, queue: impl Into<String>) -> Self {
        self.job().queue = queue.into();
        self
    }

    /// Sets the jobs' kind.
    pub fn kind(mut self, kind: impl Into<String>) -> Self {
        self.job().kind = kind.into();
        self
    }

    /// Sets the jobs' payload.
    pub fn payload(mut self, payload: impl Into<Bytes>) -> Self {
        self.job().payload = payload.into();
        self
    }

    /// Adds a header to the jobs.
    pub fn header(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.job().headers.insert(key.into(), value.into());
        self
    }

    /// Sets the jobs' priority (0 lowest .. 9 highest).
    pub fn priority(mut self, priority: u32) -> Self {
        self.job().priority = priority;
        self
    }

    /// Ticks missed while no broker could fire them enqueue nothing (the default runs
    /// the most recent one once).
    pub fn skip_missed_ticks(mut self) -> Self {
        self.0.missed_ticks = pb::MissedTickPolicy::Skip as i32;
        self
    }

    /// Skips a tick while the previous tick's job has not finished.
    pub fn skip_overlap(mut self) -> Self {
        self.0.overlap = pb::OverlapPolicy::Skip as i32;
        self
    }

    /// Creates the schedule paused.
    pub fn paused(mut self) -> Self {
        self.0.paused = true;
        self
    }

    /// The request message.
    pub fn into_proto(self) -> pb::ScheduleSpec {
        self.0
    }
}

impl From<ScheduleSpec> for pb::ScheduleSpec {
    fn from(spec: ScheduleSpec) -> Self {
        spec.0
    }
}

impl Client {
    /// Creates a schedule (ALREADY_EXISTS if the name is taken).
    pub async fn create_schedule(
        &self,
        spec: impl Into<pb::ScheduleSpec>,
    ) -> Result<pb::ScheduleInfo> {
        Ok(self
            .rpc
            .clone()
            .create_schedule(spec.into())
            .await?
            .into_inner())
    }

    /// Replaces a schedule's definition, keeping its progress.
    pub async fn update_schedule(
        &self,
        spec: impl Into<pb::ScheduleSpec>,
    ) -> Result<pb::ScheduleInfo> {
        Ok(self
            .rpc
            .clone()
            .update_schedule(spec.into())
            .await?
            .into_inner())
    }

    /// Creates the schedule, or updates it if one of that name exists: what a program
    /// that registers its schedules at every start calls.
    pub async fn upsert_schedule(
        &self,
        spec: impl Into<pb::ScheduleSpec>,
    ) -> Result<pb::ScheduleInfo> {
        let spec = spec.into();
        match self.rpc.clone().create_schedule(spec.clone()).await {
            Err(s) if s.code() == tonic::Code::AlreadyExists => self.update_schedule(spec).await,
            other => Ok(other?.into_inner()),
        }
    }

    /// Deletes a schedule.
    pub async fn delete_schedule(&self, name: &str) -> Result<()> {
        let request = pb::DeleteScheduleRequest {
            name: name.to_owned(),
        };
        self.rpc.clone().delete_schedule(request).await?;
        Ok(())
    }

    /// Pauses a schedule.
    pub async fn pause_schedule(&self, name: &str) -> Result<pb::ScheduleInfo> {
        let request = pb::PauseScheduleRequest {
            name: name.to_owned(),
        };
        Ok(self.rpc.clone().pause_schedule(request).await?.into_inner())
    }

    /// Resumes a paused schedule from its next tick.
    pub async fn resume_schedule(&self, name: &str) -> Result<pb::ScheduleInfo> {
        let request = pb::ResumeScheduleRequest {
            name: name.to_owned(),
        };
        Ok(self
            .rpc
            .clone()
            .resume_schedule(request)
            .await?
            .into_inner())
    }

    /// Every schedule (of queues the token may administer), by name.
    pub async fn list_schedules(&self) -> Result<Vec<pb::ScheduleInfo>> {
        let request = pb::ListSchedulesRequest::default();
        Ok(self
            .rpc
            .clone()
            .list_schedules(request)
            .await?
            .into_inner()
            .schedules)
    }
}
