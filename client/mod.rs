//! The typed Rust client of Sluice.
//!
//! ```no_run
//! # async fn demo() -> sluice::client::Result<()> {
//! use sluice::client::{Client, Json};
//! use futures::StreamExt;
//!
//! let client = Client::connect("http://127.0.0.1:50051").await?;
//!
//! // Work queue: enqueue, lease, ack.
//! client.enqueue("emails", "hello").kind("welcome").priority(5).send().await?;
//! for lease in client.lease("emails").max_jobs(10).wait(std::time::Duration::from_secs(5)).send().await? {
//!     println!("{} {:?}", lease.kind(), lease.payload());
//!     lease.ack().await?;
//! }
//!
//! // Topics: subscribe (resumes by itself after a reconnect), publish.
//! let mut events = client.subscribe("user.*").json::<serde_json::Value>().await?;
//! client.publish_json("user.registered", &serde_json::json!({"id": 1})).await?;
//! if let Some(delivery) = events.next().await {
//!     println!("{:?}", delivery?.value);
//! }
//! # Ok(()) }
//! ```
//!
//! This module talks to the broker only through the generated gRPC stubs in
//! [`crate::pb`]; it never imports the server code.

mod balance;
mod codec;
mod consumer;
mod error;
mod policy;
mod producer;
mod request;
mod retry;
mod schedule;
mod schema;
mod subscribe;
pub mod trace;
mod transport;
mod worker;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use tonic::transport::Channel;
use tracing::Instrument;

use crate::pb;
use crate::pb::broker_client::BrokerClient;

pub use codec::{CONTENT_TYPE, Codec, Json, Protobuf, Raw};
pub use consumer::{ConsumeBuilder, Consumer};
pub use error::{ClientError, Result, root_cause};
pub use policy::Policy;
pub use producer::{Enqueuer, Publisher};
pub use request::{CORRELATION_ID, ERROR_HEADER, REPLY_TO};
pub use schedule::ScheduleSpec;
pub use schema::{SchemaSet, TargetSchema};
pub use subscribe::{Delivery, StartAt, Subscribe};
pub use transport::{ConnectOptions, MAX_FRAME_BYTES, Rpc, Transport};
pub use worker::{
    Done, Failure, JobContext, JobError, MAX_CONCURRENCY, MAX_VISIBILITY_TIMEOUT,
    MIN_VISIBILITY_TIMEOUT, UnknownKind, Worker, WorkerReport,
};

/// Largest message the client sends or accepts (a whole batch).
const MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;

/// A connection to a Sluice broker. Cheap to clone: clones share one HTTP/2 connection.
#[derive(Clone, Debug)]
pub struct Client {
    rpc: Rpc,
}

/// One Publish request, for the unary call or a [`Publisher`] stream, sent in `span` (see
/// [`trace::producer_span`]): its messages carry the span's trace context.
fn publish_request(
    span: &tracing::Span,
    topic: &str,
    messages: Vec<Message>,
) -> pb::PublishRequest {
    let context = trace::context_of(span);
    pb::PublishRequest {
        topic: topic.to_owned(),
        messages: messages
            .into_iter()
            .map(|mut m| {
                trace::inject_missing(&context, &mut m.0.headers);
                m.0
            })
            .collect(),
    }
}

/// One Enqueue request, for the unary call or an [`Enqueuer`] stream, sent in `span`: its
/// jobs carry the span's trace context.
fn enqueue_request(span: &tracing::Span, queue: &str, jobs: Vec<Job>) -> pb::EnqueueRequest {
    let context = trace::context_of(span);
    pb::EnqueueRequest {
        queue: queue.to_owned(),
        jobs: jobs
            .into_iter()
            .map(|mut j| {
                trace::inject_missing(&context, &mut j.0.headers);
                j.0
            })
            .collect(),
    }
}

/// The results of an Enqueue request.
fn enqueued(results: Vec<pb::EnqueueResult>) -> Vec<Enqueued> {
    results
        .into_iter()
        .map(|r| Enqueued {
            job_id: r.job_id,
            duplicate: r.duplicate,
        })
        .collect()
}

fn millis(d: Duration) -> u64 {
    d.as_millis().min(u64::MAX as u128) as u64
}

impl Client {
    /// Connects to `url`, e.g. `http://127.0.0.1:50051`, without a token or TLS.
    pub async fn connect(url: impl Into<String>) -> Result<Self> {
        Self::connect_with(url, ConnectOptions::new()).await
    }

    /// Connects to `url` with a bearer token and TLS settings; see [`ConnectOptions`].
    pub async fn connect_with(url: impl Into<String>, options: ConnectOptions) -> Result<Self> {
        let channel = options.endpoint(&url.into())?.connect().await?;
        Ok(Self::from_transport(options.transport(channel)?))
    }

    /// Connects to several brokers serving the same queues and topics (e.g. Sluice nodes
    /// over one Redis) and spreads requests over them. A broker that stops accepting
    /// connections is left out within about half a second (requests sent to it before
    /// that fail with UNAVAILABLE, as with one broker) and taken back once it accepts
    /// again; while every broker is down, requests fail with UNAVAILABLE. Connections are
    /// made on first use, so this succeeds while brokers are still starting.
    ///
    /// `options` apply to every URL (one token, one CA).
    ///
    /// ```no_run
    /// # async fn demo() -> sluice::client::Result<()> {
    /// use sluice::client::{Client, ConnectOptions};
    /// let client = Client::connect_any(
    ///     ["http://127.0.0.1:50051", "http://127.0.0.1:50052", "http://127.0.0.1:50053"],
    ///     ConnectOptions::new(),
    /// )?;
    /// client.enqueue("emails", "hello").send().await?;
    /// # Ok(()) }
    /// ```
    ///
    /// Needs a Tokio runtime (it starts the task that checks the brokers).
    pub fn connect_any<I, S>(urls: I, options: ConnectOptions) -> Result<Self>
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let endpoints = urls
            .into_iter()
            .map(|url| options.endpoint(&url.into()))
            .collect::<Result<Vec<_>>>()?;
        let channel = balance::balanced(endpoints)?;
        Ok(Self::from_transport(options.transport(channel)?))
    }

    /// Wraps an existing channel (no token).
    pub fn from_channel(channel: Channel) -> Self {
        Self::from_transport(Transport::new(channel))
    }

    /// Wraps an existing transport.
    pub fn from_transport(transport: Transport) -> Self {
        Self {
            rpc: BrokerClient::new(transport)
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
        }
    }

    /// The generated gRPC client, for RPCs this wrapper does not cover (queue
    /// administration, stats, redrive...).
    pub fn rpc(&self) -> Rpc {
        self.rpc.clone()
    }

    // ---- topics -----------------------------------------------------------------------

    /// Publishes one raw payload; returns its sequence number.
    pub async fn publish(&self, topic: &str, payload: impl Into<Bytes>) -> Result<u64> {
        self.publish_message(topic, Message::new(payload)).await
    }

    /// Publishes one value as JSON (header `content-type: application/json`).
    pub async fn publish_json<T: serde::Serialize + serde::de::DeserializeOwned>(
        &self,
        topic: &str,
        value: &T,
    ) -> Result<u64> {
        self.publish_encoded(topic, &Json, value).await
    }

    /// Publishes one value with a codec (sets `content-type`).
    pub async fn publish_encoded<T, C: Codec<T>>(
        &self,
        topic: &str,
        codec: &C,
        value: &T,
    ) -> Result<u64> {
        let message = Message::new(codec.encode(value)?).header(CONTENT_TYPE, codec.content_type());
        self.publish_message(topic, message).await
    }

    /// Publishes one message with headers and keys.
    pub async fn publish_message(&self, topic: &str, message: Message) -> Result<u64> {
        let results = self.publish_batch(topic, vec![message]).await?;
        Ok(results[0].sequence)
    }

    /// Publishes up to 1,000 messages to one topic in one call; returns one result per
    /// message, in order.
    pub async fn publish_batch(
        &self,
        topic: &str,
        messages: Vec<Message>,
    ) -> Result<Vec<pb::PublishResult>> {
        let span = trace::producer_span("publish", topic);
        let request = publish_request(&span, topic, messages);
        let mut rpc = self.rpc.clone();
        Ok(rpc
            .publish(request)
            .instrument(span)
            .await?
            .into_inner()
            .results)
    }

    /// A publisher that sends its requests over one `PublishStream` call, up to 256 in
    /// flight at once: for producers that publish many small batches, it saves the set-up
    /// of one call per request. Clones share the stream, which is opened on the first
    /// request and again after it broke. Call it inside a Tokio runtime: the stream is
    /// driven by a task of its own.
    pub fn publisher(&self) -> Publisher {
        Publisher::new(self.rpc.clone())
    }

    /// Starts a subscription to a topic name or pattern (`user.*`, `todo.>`); finish it
    /// with [`Subscribe::raw`], [`Subscribe::json`] or [`Subscribe::decoded`].
    pub fn subscribe(&self, pattern: &str) -> Subscribe {
        Subscribe::new(self.rpc.clone(), pattern)
    }

    // ---- work queues ----------------------------------------------------------------------

    /// Starts an enqueue of one raw payload; finish it with [`EnqueueBuilder::send`].
    pub fn enqueue(&self, queue: &str, payload: impl Into<Bytes>) -> EnqueueBuilder {
        EnqueueBuilder {
            rpc: self.rpc.clone(),
            queue: queue.to_owned(),
            job: Job::new(payload),
        }
    }

    /// Starts an enqueue of a value as JSON (sets `content-type`).
    pub fn enqueue_json<T: serde::Serialize + serde::de::DeserializeOwned>(
        &self,
        queue: &str,
        value: &T,
    ) -> Result<EnqueueBuilder> {
        self.enqueue_encoded(queue, &Json, value)
    }

    /// Starts an enqueue of a value with a codec (sets `content-type`).
    pub fn enqueue_encoded<T, C: Codec<T>>(
        &self,
        queue: &str,
        codec: &C,
        value: &T,
    ) -> Result<EnqueueBuilder> {
        Ok(self
            .enqueue(queue, codec.encode(value)?)
            .header(CONTENT_TYPE, codec.content_type()))
    }

    /// Enqueues up to 1,000 jobs into one queue in one call, all or none.
    pub async fn enqueue_batch(&self, queue: &str, jobs: Vec<Job>) -> Result<Vec<Enqueued>> {
        send_enqueue(&self.rpc, queue, jobs).await
    }

    /// An enqueuer that sends its requests over one `EnqueueStream` call; see
    /// [`Client::publisher`].
    pub fn enqueuer(&self) -> Enqueuer {
        Enqueuer::new(self.rpc.clone())
    }

    /// Starts a lease request; finish it with [`LeaseBuilder::send`].
    pub fn lease(&self, queue: &str) -> LeaseBuilder {
        LeaseBuilder {
            rpc: self.rpc.clone(),
            request: pb::LeaseRequest {
                queue: queue.to_owned(),
                max_jobs: 1,
                ..Default::default()
            },
        }
    }

    /// Starts a streaming consumer of `queue` (the fast path for workers): the broker
    /// pushes jobs as credit allows and acks flow back on the same stream. Finish it with
    /// [`ConsumeBuilder::open`].
    pub fn consume(&self, queue: &str) -> ConsumeBuilder {
        ConsumeBuilder {
            rpc: self.rpc.clone(),
            first: pb::ConsumeRequest {
                queue: queue.to_owned(),
                credits: 100,
                ..Default::default()
            },
        }
    }

    /// Acks many leases in one call, all or none (a stale lease fails the whole call).
    pub async fn ack_batch(&self, leases: Vec<Lease>) -> Result<()> {
        let acks = leases
            .into_iter()
            .map(|l| pb::LeaseAck {
                lease_id: l.job.lease_id,
                result: Bytes::new(),
            })
            .collect();
        self.rpc.clone().ack(pb::AckRequest { acks }).await?;
        Ok(())
    }

    /// A job's state and history.
    pub async fn get_job(&self, id: &str) -> Result<pb::Job> {
        let request = pb::GetJobRequest {
            id: id.to_owned(),
            queue: String::new(),
        };
        Ok(self.rpc.clone().get_job(request).await?.into_inner())
    }

    /// Cancels a job that is not leased.
    pub async fn cancel_job(&self, id: &str) -> Result<pb::Job> {
        let request = pb::CancelJobRequest {
            id: id.to_owned(),
            queue: String::new(),
        };
        Ok(self.rpc.clone().cancel_job(request).await?.into_inner())
    }

    /// Deletes job `job_id` of `queue` whatever its state (a lease on it becomes stale);
    /// returns the job as it was.
    pub async fn delete_job(&self, queue: &str, job_id: &str) -> Result<pb::Job> {
        let request = pb::DeleteJobRequest {
            queue: queue.to_owned(),
            job_id: job_id.to_owned(),
        };
        let reply = self.rpc.clone().delete_job(request).await?.into_inner();
        Ok(reply.job.unwrap_or_default())
    }

    /// Creates a queue with a policy (a [`Policy`] or the message itself).
    pub async fn create_queue(
        &self,
        name: &str,
        policy: impl Into<pb::QueuePolicy>,
    ) -> Result<pb::QueueInfo> {
        let request = pb::CreateQueueRequest {
            name: name.to_owned(),
            policy: Some(policy.into()),
        };
        Ok(self.rpc.clone().create_queue(request).await?.into_inner())
    }

    /// Changes the fields `policy` sets of a queue's policy.
    pub async fn update_queue(
        &self,
        name: &str,
        policy: impl Into<pb::QueuePolicy>,
    ) -> Result<pb::QueueInfo> {
        let request = pb::UpdateQueueRequest {
            name: name.to_owned(),
            policy: Some(policy.into()),
        };
        Ok(self.rpc.clone().update_queue(request).await?.into_inner())
    }

    /// Counters of every queue and topic.
    pub async fn stats(&self) -> Result<pb::StatsResponse> {
        Ok(self
            .rpc
            .clone()
            .stats(pb::StatsRequest::default())
            .await?
            .into_inner())
    }
}

/// A message to publish.
#[derive(Debug, Clone, Default)]
pub struct Message(pb::PublishMessage);

impl Message {
    /// A message with this payload.
    pub fn new(payload: impl Into<Bytes>) -> Self {
        Self(pb::PublishMessage {
            payload: payload.into(),
            ..Default::default()
        })
    }

    /// Adds a header.
    pub fn header(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.0.headers.insert(key.into(), value.into());
        self
    }

    /// Sets the application key.
    pub fn key(mut self, key: impl Into<String>) -> Self {
        self.0.key = key.into();
        self
    }

    /// Sets the idempotency key (dedup within the topic's window).
    pub fn idempotency_key(mut self, key: impl Into<String>) -> Self {
        self.0.idempotency_key = key.into();
        self
    }
}

/// A job to enqueue in a batch.
#[derive(Debug, Clone, Default)]
pub struct Job(pb::JobSpec);

impl Job {
    /// A job with this payload.
    pub fn new(payload: impl Into<Bytes>) -> Self {
        Self(pb::JobSpec {
            payload: payload.into(),
            ..Default::default()
        })
    }

    /// Sets the job type workers route on.
    pub fn kind(mut self, kind: impl Into<String>) -> Self {
        self.0.kind = kind.into();
        self
    }

    /// Sets the priority (0 lowest .. 9 highest).
    pub fn priority(mut self, priority: u32) -> Self {
        self.0.priority = priority;
        self
    }

    /// Makes the job invisible for `delay`.
    pub fn delay(mut self, delay: Duration) -> Self {
        self.0.delay_ms = millis(delay);
        self
    }

    /// Makes the job invisible until `at`.
    pub fn run_at(mut self, at: SystemTime) -> Self {
        self.0.run_at_unix_ms = at.duration_since(UNIX_EPOCH).map(millis).unwrap_or(0);
        self
    }

    /// Sets the deliveries allowed before dead-lettering.
    pub fn max_attempts(mut self, n: u32) -> Self {
        self.0.max_attempts = n;
        self
    }

    /// Sets the idempotency key (dedup within the queue's window).
    pub fn idempotency_key(mut self, key: impl Into<String>) -> Self {
        self.0.idempotency_key = key.into();
        self
    }

    /// Sets the ordering key (jobs with one key run one at a time, in order).
    pub fn ordering_key(mut self, key: impl Into<String>) -> Self {
        self.0.ordering_key = key.into();
        self
    }

    /// Adds a header.
    pub fn header(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.0.headers.insert(key.into(), value.into());
        self
    }
}

/// The outcome of an enqueue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Enqueued {
    /// The job id (the original job's for a duplicate).
    pub job_id: String,
    /// Whether the idempotency key matched an earlier job.
    pub duplicate: bool,
}

/// One job being enqueued; see [`Client::enqueue`].
#[must_use = "call .send().await to enqueue"]
#[derive(Debug)]
pub struct EnqueueBuilder {
    rpc: Rpc,
    queue: String,
    job: Job,
}

macro_rules! forward_job_setters {
    ($($(#[$doc:meta])* $name:ident($($arg:ident: $ty:ty),*);)*) => {
        $($(#[$doc])* pub fn $name(mut self, $($arg: $ty),*) -> Self {
            self.job = self.job.$name($($arg),*);
            self
        })*
    };
}

impl EnqueueBuilder {
    forward_job_setters! {
        /// Sets the job type workers route on.
        kind(kind: impl Into<String>);
        /// Sets the priority (0 lowest .. 9 highest).
        priority(priority: u32);
        /// Makes the job invisible for `delay`.
        delay(delay: Duration);
        /// Makes the job invisible until `at`.
        run_at(at: SystemTime);
        /// Sets the deliveries allowed before dead-lettering.
        max_attempts(n: u32);
        /// Sets the idempotency key.
        idempotency_key(key: impl Into<String>);
        /// Sets the ordering key.
        ordering_key(key: impl Into<String>);
        /// Adds a header.
        header(key: impl Into<String>, value: impl Into<String>);
    }

    /// Enqueues the job.
    pub async fn send(self) -> Result<Enqueued> {
        let mut results = send_enqueue(&self.rpc, &self.queue, vec![self.job]).await?;
        Ok(results.remove(0))
    }
}

/// The unary Enqueue of `jobs` into `queue`, in a producer span.
async fn send_enqueue(rpc: &Rpc, queue: &str, jobs: Vec<Job>) -> Result<Vec<Enqueued>> {
    let span = trace::producer_span("enqueue", queue);
    let request = enqueue_request(&span, queue, jobs);
    let results = rpc
        .clone()
        .enqueue(request)
        .instrument(span)
        .await?
        .into_inner()
        .results;
    Ok(enqueued(results))
}

/// A lease request; see [`Client::lease`].
#[must_use = "call .send().await to lease"]
#[derive(Debug)]
pub struct LeaseBuilder {
    rpc: Rpc,
    request: pb::LeaseRequest,
}

impl LeaseBuilder {
    /// Most jobs to lease (default 1, maximum 1,000).
    pub fn max_jobs(mut self, n: u32) -> Self {
        self.request.max_jobs = n;
        self
    }

    /// Lease duration (default: the queue's visibility timeout).
    pub fn visibility_timeout(mut self, d: Duration) -> Self {
        self.request.visibility_timeout_ms = millis(d);
        self
    }

    /// Long-poll up to `d` when the queue is empty (maximum 60 s).
    pub fn wait(mut self, d: Duration) -> Self {
        self.request.wait_ms = millis(d);
        self
    }

    /// The worker's name, shown by ListConsumers.
    pub fn consumer(mut self, name: impl Into<String>) -> Self {
        self.request.consumer = name.into();
        self
    }

    /// Leases the jobs (possibly none).
    pub async fn send(self) -> Result<Vec<Lease>> {
        let jobs = self
            .rpc
            .clone()
            .lease(self.request)
            .await?
            .into_inner()
            .jobs;
        Ok(jobs
            .into_iter()
            .map(|job| Lease {
                rpc: self.rpc.clone(),
                job,
                ticket: None,
            })
            .collect())
    }
}

/// What a nack did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NackOutcome {
    /// `Retrying`, `Pending` or `Dead`.
    pub state: pb::JobState,
    /// When the job is visible again (retries only), unix ms.
    pub next_attempt_unix_ms: u64,
}

/// A job state's name as people read and type it: `pending`, `dead`, ... (the generated
/// `JOB_STATE_*` name, without its prefix, in lower case). `None` for a value this client
/// does not know (a state of a newer broker).
pub fn job_state_name(state: i32) -> Option<String> {
    let state = pb::JobState::try_from(state).ok()?;
    Some(
        state
            .as_str_name()
            .trim_start_matches("JOB_STATE_")
            .to_ascii_lowercase(),
    )
}

/// The state a [`job_state_name`] names, in any case; `None` for any other text, including
/// `unspecified`, which names no state.
pub fn job_state_named(name: &str) -> Option<pb::JobState> {
    pb::JobState::from_str_name(&format!("JOB_STATE_{}", name.to_ascii_uppercase()))
        .filter(|state| *state != pb::JobState::Unspecified)
}

/// One leased job. Settle it with [`Lease::ack`] or [`Lease::nack`]; a lease left alone
/// expires and the job is delivered again.
#[must_use = "a lease must be acked or nacked, or it expires and the job is redelivered"]
#[derive(Debug, Clone)]
pub struct Lease {
    rpc: Rpc,
    job: pb::LeasedJob,
    /// Set for leases from a consume stream: acks go on the stream, and dropping the last
    /// clone gives the stream's credit back.
    ticket: Option<Arc<consumer::StreamTicket>>,
}

impl Lease {
    pub(crate) fn from_stream(
        rpc: Rpc,
        job: pb::LeasedJob,
        shared: Arc<consumer::StreamShared>,
    ) -> Self {
        Self {
            rpc,
            job,
            ticket: Some(Arc::new(consumer::StreamTicket { shared })),
        }
    }

    /// The job id.
    pub fn job_id(&self) -> &str {
        &self.job.job_id
    }

    /// This delivery's lease id.
    pub fn lease_id(&self) -> &str {
        &self.job.lease_id
    }

    /// The queue.
    pub fn queue(&self) -> &str {
        &self.job.queue
    }

    /// The job type.
    pub fn kind(&self) -> &str {
        &self.job.kind
    }

    /// The raw payload.
    pub fn payload(&self) -> &Bytes {
        &self.job.payload
    }

    /// The headers.
    pub fn headers(&self) -> &HashMap<String, String> {
        &self.job.headers
    }

    /// Delivery number, from 1.
    pub fn attempt(&self) -> u32 {
        self.job.attempt
    }

    /// Deliveries allowed before dead-lettering.
    pub fn max_attempts(&self) -> u32 {
        self.job.max_attempts
    }

    /// When the lease expires unless extended, unix ms.
    pub fn deadline_unix_ms(&self) -> u64 {
        self.job.lease_deadline_unix_ms
    }

    /// A consumer span (`process <queue>`) to handle this job in: the child of the trace
    /// context the job carries (see [`trace`]), with its id, kind and attempt. The
    /// [`Worker`] runs each job's handler in it.
    pub fn span(&self) -> tracing::Span {
        let span = trace::consumer_span(self.queue(), self.headers());
        span.record("messaging.message.id", self.job_id());
        span.record("sluice.job.kind", self.kind());
        span.record("sluice.job.attempt", self.attempt());
        span
    }

    /// The whole leased job as the broker sent it.
    pub fn job(&self) -> &pb::LeasedJob {
        &self.job
    }

    /// Decodes the payload with a codec.
    pub fn decode<T, C: Codec<T>>(&self, codec: &C) -> Result<T> {
        codec.decode(&self.job.payload, &format!("job {}", self.job.job_id))
    }

    /// Decodes a JSON payload.
    pub fn json<T: serde::Serialize + serde::de::DeserializeOwned>(&self) -> Result<T> {
        self.decode(&Json)
    }

    /// Marks the job done.
    pub async fn ack(self) -> Result<()> {
        self.ack_with_result(Bytes::new()).await
    }

    /// Marks the job done and stores a result with it (shown by GetJob / JobHistory).
    ///
    /// For a lease from a [`Consumer`], the ack is queued on the stream and this returns
    /// at once; a refusal arrives on the consumer as [`ClientError::Refused`].
    pub async fn ack_with_result(mut self, result: impl Into<Bytes>) -> Result<()> {
        let mut ack = pb::LeaseAck {
            lease_id: std::mem::take(&mut self.job.lease_id),
            result: result.into(),
        };
        if let Some(ticket) = &self.ticket {
            match ticket.shared.push_ack(ack) {
                None => return Ok(()),
                Some(back) => ack = back,
            }
        }
        self.rpc
            .clone()
            .ack(pb::AckRequest { acks: vec![ack] })
            .await?;
        Ok(())
    }

    /// Marks this delivery failed; the job retries per the queue's backoff policy or dies
    /// if this was its last attempt.
    pub async fn nack(self, error: impl Into<String>) -> Result<NackOutcome> {
        self.settle_failed(error.into(), None, false).await
    }

    /// Marks this delivery failed and retries after `delay`.
    pub async fn nack_after(
        self,
        error: impl Into<String>,
        delay: Duration,
    ) -> Result<NackOutcome> {
        self.settle_failed(
            error.into(),
            Some(delay.max(Duration::from_millis(1))),
            false,
        )
        .await
    }

    /// Marks the job as poison: it goes to the dead-letter queue now.
    pub async fn dead_letter(self, error: impl Into<String>) -> Result<NackOutcome> {
        self.settle_failed(error.into(), None, true).await
    }

    async fn settle_failed(
        mut self,
        error: String,
        delay: Option<Duration>,
        dead_letter: bool,
    ) -> Result<NackOutcome> {
        let request = pb::NackRequest {
            lease_id: std::mem::take(&mut self.job.lease_id),
            error,
            retry_delay_ms: delay.map(millis).unwrap_or(0),
            dead_letter,
        };
        let response = self.rpc.clone().nack(request).await?.into_inner();
        Ok(NackOutcome {
            state: pb::JobState::try_from(response.state).unwrap_or(pb::JobState::Unspecified),
            next_attempt_unix_ms: response.next_attempt_unix_ms,
        })
    }

    /// Moves the deadline to now + `visibility_timeout`.
    pub async fn extend(&mut self, visibility_timeout: Duration) -> Result<()> {
        let request = pb::ExtendLeaseRequest {
            lease_id: self.job.lease_id.clone(),
            visibility_timeout_ms: millis(visibility_timeout).max(1),
        };
        let response = self.rpc.clone().extend_lease(request).await?.into_inner();
        self.job.lease_deadline_unix_ms = response.lease_deadline_unix_ms;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_state_names_read_back_as_their_states() {
        assert_eq!(
            job_state_name(pb::JobState::Dead as i32).as_deref(),
            Some("dead")
        );
        assert_eq!(job_state_name(99), None);
        for state in (1..).map_while(|value| pb::JobState::try_from(value).ok()) {
            let name = job_state_name(state as i32).expect("a known state");
            assert_eq!(job_state_named(&name), Some(state));
            assert_eq!(job_state_named(&name.to_uppercase()), Some(state));
        }
        assert_eq!(job_state_named("unspecified"), None);
        assert_eq!(job_state_named("JOB_STATE_DEAD"), None);
    }
}
