//! Engines: where queues and topics live, behind one interface, [`Engine`].
//!
//! * `local`: in this process (memory, or memory plus the write-ahead log): [`Broker`].
//! * `redis`: in Redis (a standalone server or a Redis Cluster), so several stateless
//!   nodes serve the same queues and topics: [`RedisEngine`].
//!
//! The gRPC service, the operations server, auth and the request limits talk to
//! [`Engine`] only. Validation that does not depend on where state lives (names, limits,
//! policies, lease ids) is in `domain` and shared by both; each engine enforces the rest
//! where its state is (the queue's own lock, or the queue's one Redis script).

pub(crate) mod checks;
pub(crate) mod local;
pub(crate) mod redis;

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;
use futures::Stream;
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

pub(crate) use self::local::Broker;
pub(crate) use self::redis::RedisEngine;

pub(crate) use self::local::admin::{PolicyPatch, QueueInfo, RedriveOutcome};
pub(crate) use self::local::consume::{ConsumeCommands, ConsumeEvent, ConsumeSpec, ConsumeStream};
pub(crate) use self::local::queues::LeaseParams;
pub(crate) use self::local::stats::{StatsSnapshot, StatsWatch};
pub(crate) use self::local::subscription::{SubscribeSpec, SubscriptionBatch};

/// A subscription's batches, whichever engine serves them. Boxed once per stream.
pub(crate) type SubscriptionStream =
    Pin<Box<dyn Stream<Item = Result<SubscriptionBatch, BrokerError>> + Send + 'static>>;

/// The client side of a consume stream as the engine reads it.
pub(crate) type ConsumeCommandStream =
    Pin<Box<dyn Stream<Item = ConsumeCommands> + Send + 'static>>;

/// The result of a change that is applied (and written to the engine's log or primary)
/// but may not be durable yet: [`Engine::confirm`] waits for `commit`, which says what to
/// wait for (a log position, or the Redis shard to `WAIT` on).
#[derive(Debug)]
#[must_use = "a change is acknowledged only after it is confirmed durable"]
pub struct Logged<T, C> {
    pub(crate) value: T,
    pub(crate) commit: C,
}

mod sealed {
    /// Only this crate's engines implement [`super::Engine`]: the interface changes with
    /// the broker's insides.
    pub trait Sealed {}
    impl Sealed for super::Broker {}
    impl Sealed for super::RedisEngine {}
}

/// What the transport asks of an engine: every RPC of `sluice.v1.Broker`, with the
/// request already authenticated and converted to domain types. Both engines give the
/// same answers and the same refusals; where an engine cannot keep a semantic, it refuses
/// with a status that says so rather than doing half.
///
/// A change is answered in two steps, `*_logged` then [`Engine::confirm`], so a stream of
/// requests applies them in order while their durability waits (fsync, or Redis `WAIT`)
/// overlap.
pub trait Engine: sealed::Sealed + Clone + Send + Sync + 'static {
    /// What a logged change waits for before it is answered.
    type Commit: Send + 'static;

    /// The request limits in force.
    fn limits(&self) -> &Limits;
    /// Cancelled when the engine shuts down; every stream ends on it.
    fn shutdown_token(&self) -> CancellationToken;
    /// Why the engine stopped accepting changes, if it did (a failed log, lost Redis).
    fn storage_failure(&self) -> Option<String>;
    /// Resolves when the engine stops accepting changes, with the reason.
    fn storage_failed(&self) -> impl Future<Output = String> + Send;
    /// Shuts the engine down: long polls return, streams and background tasks end, and
    /// the in-process engine closes its log.
    fn close(&self);

    /// Appends messages to a topic, up to the durability wait.
    fn publish_logged(
        &self,
        topic: &str,
        messages: Vec<NewMessage>,
    ) -> impl Future<Output = Result<Logged<Vec<Appended>, Self::Commit>, BrokerError>> + Send;
    /// Enqueues jobs (converted one by one; the first refusal refuses the batch), up to
    /// the durability wait. `now` is the request's one clock reading.
    fn enqueue_logged(
        &self,
        queue: &str,
        jobs: impl ExactSizeIterator<Item = Result<NewJob, BrokerError>> + Send,
        now: Millis,
    ) -> impl Future<Output = Result<Logged<Vec<Enqueued>, Self::Commit>, BrokerError>> + Send;
    /// Waits until a logged change is durable, then hands back its result.
    fn confirm<T: Send>(
        &self,
        logged: Logged<T, Self::Commit>,
    ) -> impl Future<Output = Result<T, BrokerError>> + Send;

    /// Opens a subscription that ends when `ends_on` (or the engine's shutdown) fires.
    fn subscribe(
        &self,
        spec: SubscribeSpec,
        ends_on: CancellationToken,
    ) -> impl Future<Output = Result<SubscriptionStream, BrokerError>> + Send;
    /// Creates a topic; returns the retention in force.
    fn create_topic(
        &self,
        name: &str,
        retention: Retention,
    ) -> impl Future<Output = Result<Retention, BrokerError>> + Send;
    /// Deletes a topic and its messages.
    fn delete_topic(&self, name: &str) -> impl Future<Output = Result<(), BrokerError>> + Send;

    /// Leases up to `params.max_jobs` jobs, long-polling up to `params.wait_ms`.
    fn lease(
        &self,
        queue: &str,
        params: LeaseParams,
    ) -> impl Future<Output = Result<Vec<Delivery>, BrokerError>> + Send;
    /// Acks leases (all or nothing per request where the engine can; see the README),
    /// each checked against `access`.
    fn ack_as(
        &self,
        access: &Access,
        acks: Vec<(String, Option<Bytes>)>,
    ) -> impl Future<Output = Result<(), BrokerError>> + Send;
    /// Fails one delivery: retry (after `retry_delay_ms` or the backoff) or dead-letter.
    fn nack_as(
        &self,
        access: &Access,
        lease_id: &str,
        error: String,
        retry_delay_ms: Option<u64>,
        dead_letter: bool,
    ) -> impl Future<Output = Result<(JobState, Option<Millis>), BrokerError>> + Send;
    /// Moves a lease's deadline; returns the new one.
    fn extend_lease_as(
        &self,
        access: &Access,
        lease_id: &str,
        visibility_timeout_ms: u64,
    ) -> impl Future<Output = Result<Millis, BrokerError>> + Send;
    /// Serves a consume stream: leases within the stream's credit, settles what it sends.
    fn consume(
        &self,
        spec: ConsumeSpec,
        commands: ConsumeCommandStream,
    ) -> impl Future<Output = Result<ConsumeStream, BrokerError>> + Send;

    /// A job by id (in `queue`, or in any), with its queue.
    fn get_job(
        &self,
        id: &str,
        queue: Option<&str>,
    ) -> impl Future<Output = Result<(String, Job), BrokerError>> + Send;
    /// Cancels a job that has not finished.
    fn cancel_job(
        &self,
        id: &str,
        queue: Option<&str>,
    ) -> impl Future<Output = Result<(String, Job), BrokerError>> + Send;
    /// Deletes a job of `queue` whatever its state; returns it as it was.
    fn delete_job(
        &self,
        queue: &str,
        id: &str,
    ) -> impl Future<Output = Result<Job, BrokerError>> + Send;
    /// A page of a queue's live jobs, and the next page's token.
    fn list_jobs(
        &self,
        queue: &str,
        state: Option<JobState>,
        page_size: usize,
        page_token: &str,
    ) -> impl Future<Output = Result<(Vec<Job>, Option<u64>), BrokerError>> + Send;
    /// A queue's most recently finished jobs, newest first.
    fn job_history(
        &self,
        queue: &str,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<Job>, BrokerError>> + Send;

    /// Creates a queue.
    fn create_queue(
        &self,
        name: &str,
        patch: PolicyPatch,
    ) -> impl Future<Output = Result<QueueInfo, BrokerError>> + Send;
    /// Changes a queue's policy.
    fn update_queue(
        &self,
        name: &str,
        patch: PolicyPatch,
    ) -> impl Future<Output = Result<QueueInfo, BrokerError>> + Send;
    /// Cancels every live job of a queue; returns how many.
    fn purge_queue(&self, name: &str) -> impl Future<Output = Result<u64, BrokerError>> + Send;
    /// Deletes a queue and its jobs.
    fn delete_queue(&self, name: &str) -> impl Future<Output = Result<(), BrokerError>> + Send;
    /// Pauses or resumes leasing from a queue.
    fn set_paused(
        &self,
        name: &str,
        paused: bool,
    ) -> impl Future<Output = Result<QueueInfo, BrokerError>> + Send;
    /// Every queue, by name.
    fn list_queues(&self) -> impl Future<Output = Result<Vec<QueueInfo>, BrokerError>> + Send;
    /// Returns dead letters to the queues they came from.
    fn redrive(
        &self,
        dead_letter_queue: &str,
        ids: &[String],
        rate_per_second: u32,
        max_jobs: u64,
        access: &Access,
    ) -> impl Future<Output = Result<RedriveOutcome, BrokerError>> + Send;
    /// The workers a queue has seen.
    fn list_consumers(
        &self,
        queue: &str,
    ) -> impl Future<Output = Result<Vec<(Arc<str>, ConsumerState)>, BrokerError>> + Send;

    /// Counters of the named queues and topics (all when both lists are empty).
    fn stats(
        &self,
        queues: &[String],
        topics: &[String],
    ) -> impl Future<Output = Result<StatsSnapshot, BrokerError>> + Send;
    /// The shared snapshot, if someone watches and it is at most one tick old.
    fn recent_stats(&self) -> Option<Arc<StatsSnapshot>>;
    /// Watches the shared snapshot (taken once a tick for every watcher).
    fn watch_stats(&self) -> StatsWatch;
    /// Installs the timing observer made by `make` unless one is installed; returns the
    /// installed one.
    fn install_observer(&self, make: impl FnOnce() -> Arc<dyn Observer>) -> Arc<dyn Observer>;

    // ---- Recurring schedules (answered once durable) ------------------------------------

    /// Creates a schedule at `now` (its first tick is the first after `now`).
    fn create_schedule(
        &self,
        spec: ScheduleSpec,
        now: Millis,
    ) -> impl Future<Output = Result<Schedule, BrokerError>> + Send;
    /// Replaces a schedule's definition, keeping its progress and paused flag.
    fn update_schedule(
        &self,
        spec: ScheduleSpec,
        now: Millis,
    ) -> impl Future<Output = Result<Schedule, BrokerError>> + Send;
    /// Deletes a schedule.
    fn delete_schedule(
        &self,
        name: &str,
        now: Millis,
    ) -> impl Future<Output = Result<(), BrokerError>> + Send;
    /// Pauses or resumes a schedule.
    fn set_schedule_paused(
        &self,
        name: &str,
        paused: bool,
        now: Millis,
    ) -> impl Future<Output = Result<Schedule, BrokerError>> + Send;
    /// One schedule by name.
    fn get_schedule(
        &self,
        name: &str,
    ) -> impl Future<Output = Result<Schedule, BrokerError>> + Send;
    /// Every schedule, by name.
    fn list_schedules(&self) -> impl Future<Output = Result<Vec<Schedule>, BrokerError>> + Send;

    // ---- Message schemas (see `domain::schema`) --------------------------------------

    /// Makes `definition` the target's schema (compiled first: a bad one changes
    /// nothing); returns the current revision and whether it is new (setting the current
    /// schema again changes nothing). Every Publish or Enqueue that starts after this
    /// returns is checked against it, on every node.
    fn set_schema(
        &self,
        target: &SchemaTarget,
        definition: SchemaDefinition,
    ) -> impl Future<Output = Result<(u32, bool), BrokerError>> + Send;
    /// A target's revisions and which is current; NOT_FOUND if it never had a schema.
    fn get_schema(
        &self,
        target: &SchemaTarget,
    ) -> impl Future<Output = Result<SchemaHistory, BrokerError>> + Send;
    /// Stops validating a target (its history stays); returns the revision that was
    /// current. NOT_FOUND if none was.
    fn delete_schema(
        &self,
        target: &SchemaTarget,
    ) -> impl Future<Output = Result<u32, BrokerError>> + Send;
    /// The current revision of every target that has a schema now (for Stats and
    /// ListQueues).
    fn schema_revisions(
        &self,
    ) -> impl Future<Output = Result<HashMap<SchemaTarget, u32>, BrokerError>> + Send;
}
