//! The in-process engine behind the [`Engine`] interface: each method is the broker's own.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;

use bytes::Bytes;
use futures::StreamExt;
use tokio_util::sync::CancellationToken;

use crate::broker::auth::Access;
use crate::broker::domain::error::BrokerError;
use crate::broker::domain::limits::Limits;
use crate::broker::domain::observe::Observer;
use crate::broker::domain::queue::{ConsumerState, Delivery, Enqueued, Job, JobState, NewJob};
use crate::broker::domain::schedule::{Schedule, ScheduleSpec};
use crate::broker::domain::schema::{SchemaDefinition, SchemaHistory, SchemaTarget};
use crate::broker::domain::time::Millis;
use crate::broker::domain::topic::{Appended, NewMessage, Retention};
use crate::broker::engine::{
    ConsumeCommandStream, ConsumeSpec, ConsumeStream, Engine, LeaseParams, PolicyPatch, QueueInfo,
    RedriveOutcome, StatsSnapshot, StatsWatch, SubscribeSpec, SubscriptionStream,
};

use crate::broker::store::Commit;

use super::{Broker, Logged};

impl Engine for Broker {
    type Commit = Commit;

    fn limits(&self) -> &Limits {
        Broker::limits(self)
    }

    fn shutdown_token(&self) -> CancellationToken {
        Broker::shutdown_token(self)
    }

    fn storage_failure(&self) -> Option<String> {
        Broker::storage_failure(self)
    }

    fn storage_failed(&self) -> impl Future<Output = String> + Send {
        Broker::storage_failed(self)
    }

    fn close(&self) {
        Broker::shutdown(self);
        Broker::close_storage(self);
    }

    fn publish_logged(
        &self,
        topic: &str,
        messages: Vec<NewMessage>,
    ) -> impl Future<Output = Result<Logged<Vec<Appended>>, BrokerError>> + Send {
        Broker::publish_logged(self, topic, messages)
    }

    fn enqueue_logged(
        &self,
        queue: &str,
        jobs: impl ExactSizeIterator<Item = Result<NewJob, BrokerError>> + Send,
        now: Millis,
    ) -> impl Future<Output = Result<Logged<Vec<Enqueued>>, BrokerError>> + Send {
        Broker::enqueue_logged(self, queue, jobs, now)
    }

    fn confirm<T: Send>(
        &self,
        logged: Logged<T>,
    ) -> impl Future<Output = Result<T, BrokerError>> + Send {
        Broker::confirm(self, logged)
    }

    async fn subscribe(
        &self,
        spec: SubscribeSpec,
        ends_on: CancellationToken,
    ) -> Result<SubscriptionStream, BrokerError> {
        Ok(Broker::subscribe(self, spec)?.ending_on(ends_on).boxed())
    }

    fn create_topic(
        &self,
        name: &str,
        retention: Retention,
    ) -> impl Future<Output = Result<Retention, BrokerError>> + Send {
        Broker::create_topic(self, name, retention)
    }

    fn delete_topic(&self, name: &str) -> impl Future<Output = Result<(), BrokerError>> + Send {
        Broker::delete_topic(self, name)
    }

    fn lease(
        &self,
        queue: &str,
        params: LeaseParams,
    ) -> impl Future<Output = Result<Vec<Delivery>, BrokerError>> + Send {
        Broker::lease(self, queue, params)
    }

    fn ack_as(
        &self,
        access: &Access,
        acks: Vec<(String, Option<Bytes>)>,
    ) -> impl Future<Output = Result<(), BrokerError>> + Send {
        Broker::ack_as(self, access, acks)
    }

    fn nack_as(
        &self,
        access: &Access,
        lease_id: &str,
        error: String,
        retry_delay_ms: Option<u64>,
        dead_letter: bool,
    ) -> impl Future<Output = Result<(JobState, Option<Millis>), BrokerError>> + Send {
        Broker::nack_as(self, access, lease_id, error, retry_delay_ms, dead_letter)
    }

    async fn extend_lease_as(
        &self,
        access: &Access,
        lease_id: &str,
        visibility_timeout_ms: u64,
    ) -> Result<Millis, BrokerError> {
        Broker::extend_lease_as(self, access, lease_id, visibility_timeout_ms)
    }

    async fn consume(
        &self,
        spec: ConsumeSpec,
        commands: ConsumeCommandStream,
    ) -> Result<ConsumeStream, BrokerError> {
        Broker::consume(self, spec, commands)
    }

    async fn get_job(&self, id: &str, queue: Option<&str>) -> Result<(String, Job), BrokerError> {
        Broker::get_job(self, id, queue)
    }

    fn cancel_job(
        &self,
        id: &str,
        queue: Option<&str>,
    ) -> impl Future<Output = Result<(String, Job), BrokerError>> + Send {
        Broker::cancel_job(self, id, queue)
    }

    fn delete_job(
        &self,
        queue: &str,
        id: &str,
    ) -> impl Future<Output = Result<Job, BrokerError>> + Send {
        Broker::delete_job(self, queue, id)
    }

    async fn list_jobs(
        &self,
        queue: &str,
        state: Option<JobState>,
        page_size: usize,
        page_token: &str,
    ) -> Result<(Vec<Job>, Option<u64>), BrokerError> {
        Broker::list_jobs(self, queue, state, page_size, page_token)
    }

    async fn job_history(&self, queue: &str, limit: usize) -> Result<Vec<Job>, BrokerError> {
        Broker::job_history(self, queue, limit)
    }

    fn create_queue(
        &self,
        name: &str,
        patch: PolicyPatch,
    ) -> impl Future<Output = Result<QueueInfo, BrokerError>> + Send {
        Broker::create_queue(self, name, patch)
    }

    fn update_queue(
        &self,
        name: &str,
        patch: PolicyPatch,
    ) -> impl Future<Output = Result<QueueInfo, BrokerError>> + Send {
        Broker::update_queue(self, name, patch)
    }

    fn purge_queue(&self, name: &str) -> impl Future<Output = Result<u64, BrokerError>> + Send {
        Broker::purge_queue(self, name)
    }

    fn delete_queue(&self, name: &str) -> impl Future<Output = Result<(), BrokerError>> + Send {
        Broker::delete_queue(self, name)
    }

    fn set_paused(
        &self,
        name: &str,
        paused: bool,
    ) -> impl Future<Output = Result<QueueInfo, BrokerError>> + Send {
        Broker::set_paused(self, name, paused)
    }

    async fn list_queues(&self) -> Result<Vec<QueueInfo>, BrokerError> {
        Ok(Broker::list_queues(self))
    }

    fn redrive(
        &self,
        dead_letter_queue: &str,
        ids: &[String],
        rate_per_second: u32,
        max_jobs: u64,
        access: &Access,
    ) -> impl Future<Output = Result<RedriveOutcome, BrokerError>> + Send {
        Broker::redrive(
            self,
            dead_letter_queue,
            ids,
            rate_per_second,
            max_jobs,
            access,
        )
    }

    async fn list_consumers(
        &self,
        queue: &str,
    ) -> Result<Vec<(Arc<str>, ConsumerState)>, BrokerError> {
        Broker::list_consumers(self, queue)
    }

    async fn stats(
        &self,
        queues: &[String],
        topics: &[String],
    ) -> Result<StatsSnapshot, BrokerError> {
        Ok(Broker::stats(self, queues, topics))
    }

    fn recent_stats(&self) -> Option<Arc<StatsSnapshot>> {
        Broker::recent_stats(self)
    }

    fn watch_stats(&self) -> StatsWatch {
        Broker::watch_stats(self)
    }

    fn install_observer(&self, make: impl FnOnce() -> Arc<dyn Observer>) -> Arc<dyn Observer> {
        Broker::install_observer(self, make)
    }

    fn create_schedule(
        &self,
        spec: ScheduleSpec,
        now: Millis,
    ) -> impl Future<Output = Result<Schedule, BrokerError>> + Send {
        Broker::create_schedule(self, spec, now)
    }

    fn update_schedule(
        &self,
        spec: ScheduleSpec,
        now: Millis,
    ) -> impl Future<Output = Result<Schedule, BrokerError>> + Send {
        Broker::update_schedule(self, spec, now)
    }

    fn delete_schedule(
        &self,
        name: &str,
        now: Millis,
    ) -> impl Future<Output = Result<(), BrokerError>> + Send {
        Broker::delete_schedule(self, name, now)
    }

    fn set_schedule_paused(
        &self,
        name: &str,
        paused: bool,
        now: Millis,
    ) -> impl Future<Output = Result<Schedule, BrokerError>> + Send {
        Broker::set_schedule_paused(self, name, paused, now)
    }

    async fn get_schedule(&self, name: &str) -> Result<Schedule, BrokerError> {
        Broker::get_schedule(self, name)
    }

    async fn list_schedules(&self) -> Result<Vec<Schedule>, BrokerError> {
        Ok(Broker::list_schedules(self))
    }

    async fn set_schema(
        &self,
        target: &SchemaTarget,
        definition: SchemaDefinition,
    ) -> Result<(u32, bool), BrokerError> {
        Broker::set_schema(self, target, definition).await
    }

    async fn get_schema(&self, target: &SchemaTarget) -> Result<SchemaHistory, BrokerError> {
        Broker::get_schema(self, target)
    }

    async fn delete_schema(&self, target: &SchemaTarget) -> Result<u32, BrokerError> {
        Broker::delete_schema(self, target).await
    }

    async fn schema_revisions(&self) -> Result<HashMap<SchemaTarget, u32>, BrokerError> {
        Ok(Broker::schema_revisions(self))
    }
}
