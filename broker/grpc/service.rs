//! The gRPC service: checks each request's access and calls the broker. The conversions
//! between `sluice.v1` messages and domain types live in `grpc::convert`.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::{Stream, StreamExt};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};
use tracing::Instrument;

use crate::broker::auth::{
    Access, Action, Authenticator, Credentials, JOB_READERS, QUEUE_WRITERS, Recheck, StreamGuard,
    request_access,
};
use crate::broker::domain::error::BrokerError;
use crate::broker::domain::names::{Pattern, validate_name};
use crate::broker::domain::queue::Enqueued;
use crate::broker::domain::schedule::Schedule;
use crate::broker::domain::schema::{SchemaTarget, TargetKind};
use crate::broker::domain::time::now_ms;
use crate::broker::domain::topic::{Appended, NewMessage, Retention};
use crate::broker::engine::{
    ConsumeCommands, ConsumeEvent, ConsumeSpec, Engine, LeaseParams, Logged, PolicyPatch,
    QueueInfo, StatsSnapshot,
};
use crate::broker::grpc::wire::{
    EncodedConsumeResponse, EncodedEnqueueResponse, EncodedEnqueueStreamResponse,
    EncodedLeaseResponse, EncodedSubscribeResponse, ReceivedConsumeRequest, broker_server,
};
use crate::broker::grpc::{convert, trace};
use crate::pb;

type Reply<T> = Result<Response<T>, Status>;
type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

/// The `sluice.v1.Broker` gRPC service over an [`Engine`].
#[derive(Clone)]
pub struct BrokerService<E> {
    broker: E,
    /// `None`: no tokens file, every request may do anything.
    auth: Option<Authenticator>,
}

impl<E: Engine> BrokerService<E> {
    /// Wraps an engine; `auth` set means every request needs a known bearer token and
    /// may do only what its grant allows.
    pub fn new(broker: E, auth: Option<Authenticator>) -> Self {
        Self { broker, auth }
    }

    /// What a request may do, from its `authorization` metadata. Every RPC asks first,
    /// before it looks at its message, so a refused request changes nothing.
    fn access<T>(&self, req: &Request<T>) -> Result<Access, Status> {
        let header = req.metadata().get("authorization").map(|v| v.as_bytes());
        Ok(request_access(self.auth.as_ref(), header)?)
    }

    /// A unary produce request's caller: its access (see [`BrokerService::access`]) and
    /// the trace context of its metadata.
    fn caller<T>(&self, req: &Request<T>) -> Result<Caller, Status> {
        Ok(Caller {
            access: self.access(req)?,
            trace: trace::metadata_parent(req.metadata()),
        })
    }

    /// A stream's credentials, from its `authorization` metadata (`None` without a
    /// tokens file); asked first, like [`BrokerService::access`].
    fn credentials<T>(&self, req: &Request<T>) -> Result<Option<Credentials>, Status> {
        let Some(auth) = &self.auth else {
            return Ok(None);
        };
        let header = req.metadata().get("authorization").map(|v| v.as_bytes());
        auth.credentials(header)
            .map(Some)
            .map_err(|failure| Status::from(failure.into_error()))
    }

    /// What a stream may do until it ends. With tokens, the stream is registered so that a
    /// reload ends it if its token is revoked or `recheck` fails on the new grant.
    fn hold_stream(&self, credentials: Option<Credentials>, recheck: Recheck) -> StreamAuth {
        let shutdown = self.broker.shutdown_token();
        match (&self.auth, credentials) {
            (Some(auth), Some(credentials)) => {
                let guard = auth.hold_stream(credentials, &shutdown, recheck);
                StreamAuth {
                    access: guard.access(),
                    ends_on: guard.token(),
                    guard: Some(guard),
                }
            }
            _ => StreamAuth {
                access: Access::open(),
                ends_on: shutdown,
                guard: None,
            },
        }
    }
}

impl<E: Engine> BrokerService<E> {
    /// The current schema revision of `target` (0: none).
    async fn schema_revision(&self, target: SchemaTarget) -> Result<u32, BrokerError> {
        match self.broker.get_schema(&target).await {
            Ok(history) => Ok(history.current),
            Err(BrokerError::NotFound(_)) => Ok(0),
            Err(e) => Err(e),
        }
    }

    /// A queue's description as the admin RPCs answer it, with its schema revision.
    async fn queue_info(&self, info: QueueInfo) -> Reply<pb::QueueInfo> {
        let schema_revision = self
            .schema_revision(SchemaTarget::queue(&info.name))
            .await?;
        Ok(Response::new(pb::QueueInfo {
            schema_revision,
            ..pb::QueueInfo::from(info)
        }))
    }
}

/// A stream's authorization: what it may do (its token's grant as of the last reload),
/// the token it ends on (shutdown, or a reload that revoked it), and its registration.
struct StreamAuth {
    access: Access,
    ends_on: CancellationToken,
    guard: Option<StreamGuard>,
}

impl StreamAuth {
    /// The response stream: `stream`, which must end when `ends_on` is cancelled, then
    /// the reload's refusal if a reload ended it.
    fn respond<T: Send + 'static>(
        self,
        stream: impl Stream<Item = Result<T, Status>> + Send + 'static,
    ) -> BoxStream<T> {
        match self.guard {
            None => Box::pin(stream),
            Some(guard) => Box::pin(Guarded {
                inner: Box::pin(stream),
                guard,
                done: false,
            }),
        }
    }
}

/// A response stream registered for tokens reloads: it ends on its guard's token, and
/// then reports why (UNAUTHENTICATED or PERMISSION_DENIED) as its last item. Holding the
/// guard keeps the registration for as long as the stream is open.
struct Guarded<T> {
    inner: BoxStream<T>,
    guard: StreamGuard,
    done: bool,
}

impl<T> Stream for Guarded<T> {
    type Item = Result<T, Status>;

    fn poll_next(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        if self.done {
            return std::task::Poll::Ready(None);
        }
        match self.inner.as_mut().poll_next(cx) {
            std::task::Poll::Ready(None) => {
                self.done = true;
                std::task::Poll::Ready(self.guard.ended().map(|e| Err(Status::from(e))))
            }
            other => other,
        }
    }
}

/// A policy reaches beyond its queue: a topic binding reads topics, so it needs
/// `subscribe` covering its pattern, and a dead-letter queue receives jobs, so it needs
/// `enqueue` or `admin` on it. Without these checks, admin on one queue would read every
/// topic or fill any queue.
fn check_policy_reach(access: &Access, patch: &PolicyPatch) -> Result<(), BrokerError> {
    for (i, binding) in patch.topic_bindings.iter().flatten().enumerate() {
        let field = format!("policy.topic_bindings[{i}]");
        let pattern = Pattern::parse(&field, binding)?;
        access.check_pattern(Action::Subscribe, &field, &pattern)?;
    }
    if let Some(dlq) = &patch.dead_letter_queue {
        access.check_any(QUEUE_WRITERS, "policy.dead_letter_queue", dlq)?;
    }
    Ok(())
}

/// Stats name queues and topics: each named one needs admin on it.
fn check_stats_filter(
    access: &Access,
    queues: &[String],
    topics: &[String],
) -> Result<(), BrokerError> {
    for q in queues {
        access.check(Action::Admin, "queues", q)?;
    }
    for t in topics {
        access.check(Action::Admin, "topics", t)?;
    }
    Ok(())
}

/// The part of a snapshot a request sees: the queues and topics it names (all when it
/// names none) that it may administer. Built from a shared snapshot without copying the
/// rest of it. The broker-wide memory figures go only to whom may administer everything.
fn stats_view(s: &StatsSnapshot, filter: &pb::StatsRequest, access: &Access) -> pb::StatsResponse {
    let named = |names: &[String], name: &str| names.is_empty() || names.iter().any(|n| n == name);
    static EVERYTHING: std::sync::LazyLock<Pattern> =
        std::sync::LazyLock::new(|| Pattern::parse("admin", ">").expect("\">\" is a pattern"));
    let sees_memory = access.check_pattern(Action::Admin, "", &EVERYTHING).is_ok();
    pb::StatsResponse {
        queues: s
            .queues
            .iter()
            .filter(|(name, _)| {
                named(&filter.queues, name) && access.allows_name(Action::Admin, name)
            })
            .map(|(name, c)| convert::queue_stats(name, c))
            .collect(),
        topics: s
            .topics
            .iter()
            .filter(|t| {
                named(&filter.topics, &t.name) && access.allows_name(Action::Admin, &t.name)
            })
            .map(pb::TopicStats::from)
            .collect(),
        taken_at_unix_ms: s.taken_at,
        memory_budget_bytes: if sees_memory {
            s.memory_budget_bytes
        } else {
            0
        },
        memory_used_bytes: if sees_memory { s.memory_used_bytes } else { 0 },
        storage: Some(pb::StorageStats::from(&s.storage)),
        // Stats adds them (`add_schedules`); WatchStats frames leave them out.
        schedules: Vec::new(),
    }
}

/// A target's current schema revision (0: none).
fn revision_of(revisions: &HashMap<SchemaTarget, u32>, target: SchemaTarget) -> u32 {
    revisions.get(&target).copied().unwrap_or(0)
}

/// Fills in each queue's and topic's current schema revision.
fn add_schema_revisions(stats: &mut pb::StatsResponse, revisions: &HashMap<SchemaTarget, u32>) {
    for q in &mut stats.queues {
        q.schema_revision = revision_of(revisions, SchemaTarget::queue(&q.name));
    }
    for t in &mut stats.topics {
        t.schema_revision = revision_of(revisions, SchemaTarget::topic(&t.name));
    }
}

/// The schedules of the queues `stats` shows (the same grant, `admin` on the queue, lets a
/// token list them).
fn add_schedules(stats: &mut pb::StatsResponse, schedules: &[Schedule]) {
    let shown: HashSet<&str> = stats.queues.iter().map(|q| q.name.as_str()).collect();
    let mine: Vec<pb::ScheduleInfo> = schedules
        .iter()
        .filter(|s| shown.contains(s.spec.template.queue.as_str()))
        .map(pb::ScheduleInfo::from)
        .collect();
    stats.schedules = mine;
}

/// A schema RPC's target, after checking the caller has `admin` on it.
fn schema_target(
    access: &Access,
    target: Option<pb::SchemaTarget>,
) -> Result<SchemaTarget, BrokerError> {
    let target = convert::schema_target(target)?;
    let field = match target.kind {
        TargetKind::Queue => "target.queue",
        TargetKind::Topic => "target.topic",
    };
    access.check(Action::Admin, field, &target.name)?;
    Ok(target)
}

fn peer(req: &Request<impl Sized>) -> String {
    req.extensions()
        .get::<crate::broker::grpc::server::ConnectionInfo>()
        .and_then(|info| info.remote_addr())
        .map(|a| a.to_string())
        .unwrap_or_default()
}

/// Requests a produce stream holds applied but unanswered while their fsyncs are pending:
/// enough to keep group commits full, small enough that one stream cannot hoard memory.
const STREAM_PIPELINE: usize = 256;

/// Who sends a produce request: what it may do, and the trace context of its metadata
/// (the parent of the broker's spans for entries that carry none of their own).
#[derive(Clone)]
struct Caller {
    access: Access,
    trace: Option<opentelemetry::Context>,
}

/// Authorizes one Publish request and applies it (the broker validates it), up to the
/// log append.
async fn publish_logged<E: Engine>(
    broker: E,
    caller: Caller,
    mut req: pb::PublishRequest,
) -> Result<Logged<Vec<Appended>, E::Commit>, BrokerError> {
    caller.access.check(Action::Publish, "topic", &req.topic)?;
    let _spans = trace::produced(
        "publish",
        &req.topic,
        caller.trace.as_ref(),
        req.messages.iter_mut().map(|m| &mut m.headers),
    );
    let messages = req.messages.into_iter().map(NewMessage::from).collect();
    broker.publish_logged(&req.topic, messages).await
}

/// Authorizes one Enqueue request, converts its jobs and applies it (the broker validates
/// it), up to the log append.
async fn enqueue_logged<E: Engine>(
    broker: E,
    caller: Caller,
    mut req: pb::EnqueueRequest,
) -> Result<Logged<Vec<Enqueued>, E::Commit>, BrokerError> {
    caller.access.check(Action::Enqueue, "queue", &req.queue)?;
    let _spans = trace::produced(
        "enqueue",
        &req.queue,
        caller.trace.as_ref(),
        req.jobs.iter_mut().map(|j| &mut j.headers),
    );
    // The one clock reading of the request: delays resolve with it and jobs are stored
    // at it. The broker checks the rest, converting the jobs as it goes.
    let now = crate::broker::domain::time::now_ms();
    let jobs = req
        .jobs
        .into_iter()
        .enumerate()
        .map(|(i, spec)| convert::new_job(i, spec, now));
    broker.enqueue_logged(&req.queue, jobs, now).await
}

/// Serves a PublishStream or EnqueueStream: applies requests one at a time in stream order,
/// and answers each in order once durable (`answer` builds the response from the results,
/// or from the refusal), with the fsyncs of up to [`STREAM_PIPELINE`] requests
/// overlapping. A request the codec cannot read ends the stream with its status. When
/// `ends_on` is cancelled (shutdown, or a reload revoked the token) reading stops and what
/// was read is answered.
fn produce_stream<E, Req, T, Resp, Applied>(
    broker: E,
    caller: Caller,
    ends_on: CancellationToken,
    inbound: tonic::Streaming<Req>,
    apply: fn(E, Caller, Req) -> Applied,
    answer: fn(Result<T, BrokerError>) -> Resp,
) -> BoxStream<Resp>
where
    E: Engine,
    Req: Send + 'static,
    T: Send + 'static,
    Resp: Send + 'static,
    Applied: Future<Output = Result<Logged<T, E::Commit>, BrokerError>> + Send + 'static,
{
    let shutdown = ends_on.cancelled_owned();
    let applying = broker.clone();
    // `then` runs one request's validation, wait for log space and append before reading
    // the next, so requests are applied in stream order; `buffered` overlaps only the
    // durability waits, and answers in order.
    let answers = inbound
        .take_until(shutdown)
        .then(move |request| {
            let applied = request.map(|req| apply(applying.clone(), caller.clone(), req));
            async move {
                match applied {
                    Ok(applied) => Ok(applied.await),
                    Err(status) => Err(status),
                }
            }
        })
        .map(move |applied| {
            let broker = broker.clone();
            async move {
                let logged = applied?;
                let confirmed = match logged {
                    Ok(logged) => broker.confirm(logged).await,
                    Err(refused) => Err(refused),
                };
                Ok(answer(confirmed))
            }
        })
        .buffered(STREAM_PIPELINE);
    Box::pin(answers)
}

/// A stream's answer to one request: its results, or (with no results) the status the
/// unary call would have returned.
fn answer_parts<T: Default>(answer: Result<T, BrokerError>) -> (T, Option<pb::Refusal>) {
    match answer {
        Ok(results) => (results, None),
        Err(e) => (T::default(), Some(pb::Refusal::from(&e))),
    }
}

#[tonic::async_trait]
impl<E: Engine> broker_server::Broker for BrokerService<E> {
    async fn publish(&self, request: Request<pb::PublishRequest>) -> Reply<pb::PublishResponse> {
        let caller = self.caller(&request)?;
        let logged = publish_logged(self.broker.clone(), caller, request.into_inner()).await?;
        let results = convert::publish_results(self.broker.confirm(logged).await?);
        Ok(Response::new(pb::PublishResponse { results }))
    }

    type PublishStreamStream = BoxStream<pb::PublishStreamResponse>;

    async fn publish_stream(
        &self,
        request: Request<tonic::Streaming<pb::PublishRequest>>,
    ) -> Reply<Self::PublishStreamStream> {
        let credentials = self.credentials(&request)?;
        // Each request is checked with the token's grant in force; a reload need only
        // find the token still known.
        let trace = trace::metadata_parent(request.metadata());
        let stream = self.hold_stream(credentials, Box::new(|_| Ok(())));
        let answers = produce_stream(
            self.broker.clone(),
            Caller {
                access: stream.access.clone(),
                trace,
            },
            stream.ends_on.clone(),
            request.into_inner(),
            publish_logged,
            |answer| {
                let (results, refused) = answer_parts(answer.map(convert::publish_results));
                pb::PublishStreamResponse { results, refused }
            },
        );
        Ok(Response::new(stream.respond(answers)))
    }

    type SubscribeStream = BoxStream<EncodedSubscribeResponse>;

    async fn subscribe(
        &self,
        request: Request<pb::SubscribeRequest>,
    ) -> Reply<Self::SubscribeStream> {
        let credentials = self.credentials(&request)?;
        let access = credentials
            .as_ref()
            .map_or_else(Access::open, Credentials::access);
        let req = request.into_inner();
        let pattern = Pattern::parse("pattern", &req.pattern)?;
        access.check_pattern(Action::Subscribe, "pattern", &pattern)?;
        let spec = convert::subscribe_spec(req, pattern, self.broker.limits().max_batch)?;
        let recheck_pattern = spec.pattern.clone();
        let stream = self.hold_stream(
            credentials,
            Box::new(move |access| {
                access.check_pattern(Action::Subscribe, "pattern", &recheck_pattern)
            }),
        );
        let subscription = self.broker.subscribe(spec, stream.ends_on.clone()).await?;
        let batches = subscription.map(|item| {
            item.map(EncodedSubscribeResponse::from)
                .map_err(Status::from)
        });
        Ok(Response::new(stream.respond(batches)))
    }

    async fn create_topic(&self, request: Request<pb::CreateTopicRequest>) -> Reply<pb::TopicInfo> {
        let access = self.access(&request)?;
        let req = request.into_inner();
        access.check(Action::Admin, "name", &req.name)?;
        let retention = Retention::from(req.retention.unwrap_or_default());
        let effective = self.broker.create_topic(&req.name, retention).await?;
        let schema_revision = self.schema_revision(SchemaTarget::topic(&req.name)).await?;
        Ok(Response::new(pb::TopicInfo {
            name: req.name,
            retention: Some(effective.into()),
            schema_revision,
        }))
    }

    async fn delete_topic(
        &self,
        request: Request<pb::DeleteTopicRequest>,
    ) -> Reply<pb::DeleteTopicResponse> {
        let access = self.access(&request)?;
        let name = request.into_inner().name;
        access.check(Action::Admin, "name", &name)?;
        self.broker.delete_topic(&name).await?;
        Ok(Response::new(pb::DeleteTopicResponse {}))
    }

    async fn enqueue(&self, request: Request<pb::EnqueueRequest>) -> Reply<EncodedEnqueueResponse> {
        let caller = self.caller(&request)?;
        let logged = enqueue_logged(self.broker.clone(), caller, request.into_inner()).await?;
        let results = self.broker.confirm(logged).await?;
        Ok(Response::new(EncodedEnqueueResponse { results }))
    }

    type EnqueueStreamStream = BoxStream<EncodedEnqueueStreamResponse>;

    async fn enqueue_stream(
        &self,
        request: Request<tonic::Streaming<pb::EnqueueRequest>>,
    ) -> Reply<Self::EnqueueStreamStream> {
        let credentials = self.credentials(&request)?;
        let trace = trace::metadata_parent(request.metadata());
        let stream = self.hold_stream(credentials, Box::new(|_| Ok(())));
        let answers = produce_stream(
            self.broker.clone(),
            Caller {
                access: stream.access.clone(),
                trace,
            },
            stream.ends_on.clone(),
            request.into_inner(),
            enqueue_logged,
            |answer| {
                let (results, refused) = answer_parts(answer);
                EncodedEnqueueStreamResponse { results, refused }
            },
        );
        Ok(Response::new(stream.respond(answers)))
    }

    async fn lease(&self, request: Request<pb::LeaseRequest>) -> Reply<EncodedLeaseResponse> {
        let access = self.access(&request)?;
        let address = peer(&request);
        let req = request.into_inner();
        access.check(Action::Consume, "queue", &req.queue)?;
        let params = LeaseParams {
            max_jobs: req.max_jobs as usize,
            visibility_timeout_ms: convert::given(req.visibility_timeout_ms),
            wait_ms: req.wait_ms,
            consumer: req.consumer.clone(),
            address,
        };
        let jobs = self.broker.lease(&req.queue, params).await?;
        trace::delivered(&req.queue, &req.consumer, &jobs);
        let queue = match jobs.first() {
            Some(d) => d.lease_id.queue.clone(),
            None => Arc::from(req.queue),
        };
        Ok(Response::new(EncodedLeaseResponse { queue, jobs }))
    }

    async fn ack(&self, request: Request<pb::AckRequest>) -> Reply<pb::AckResponse> {
        let access = self.access(&request)?;
        let span = trace::settle_span("ack", request.metadata());
        let acks = request
            .into_inner()
            .acks
            .into_iter()
            .map(|a| (a.lease_id, convert::given(a.result)))
            .collect();
        self.broker.ack_as(&access, acks).instrument(span).await?;
        Ok(Response::new(pb::AckResponse {}))
    }

    async fn nack(&self, request: Request<pb::NackRequest>) -> Reply<pb::NackResponse> {
        let access = self.access(&request)?;
        let span = trace::settle_span("nack", request.metadata());
        let req = request.into_inner();
        let (state, at) = self
            .broker
            .nack_as(
                &access,
                &req.lease_id,
                req.error,
                convert::given(req.retry_delay_ms),
                req.dead_letter,
            )
            .instrument(span)
            .await?;
        Ok(Response::new(pb::NackResponse {
            state: pb::JobState::from(state) as i32,
            next_attempt_unix_ms: at.unwrap_or(0),
        }))
    }

    type ConsumeStream = BoxStream<EncodedConsumeResponse>;

    async fn consume(
        &self,
        request: Request<tonic::Streaming<ReceivedConsumeRequest>>,
    ) -> Reply<Self::ConsumeStream> {
        let credentials = self.credentials(&request)?;
        let access = credentials
            .as_ref()
            .map_or_else(Access::open, Credentials::access);
        let address = peer(&request);
        let mut inbound = request.into_inner();
        let first = inbound.message().await?.ok_or_else(|| {
            BrokerError::invalid("queue", "the stream ended before its first request")
        })?;
        if first.queue.is_empty() {
            return Err(BrokerError::invalid(
                "queue",
                "the first ConsumeRequest of a stream must name the queue",
            )
            .into());
        }
        access.check(Action::Consume, "queue", &first.queue)?;
        let recheck_queue = first.queue.clone();
        let stream = self.hold_stream(
            credentials,
            Box::new(move |access| access.check(Action::Consume, "queue", &recheck_queue)),
        );
        let spec = ConsumeSpec {
            // Acks of other queues' leases are checked with the grant in force.
            access: stream.access.clone(),
            queue: first.queue.clone(),
            consumer: first.consumer.clone(),
            address,
            visibility_timeout_ms: convert::given(first.visibility_timeout_ms),
            ends_on: Some(stream.ends_on.clone()),
        };
        // The client side ends at its first transport error; what it held is released.
        let rest = inbound
            .take_while(|r| futures::future::ready(r.is_ok()))
            .filter_map(|r| futures::future::ready(r.ok()))
            .map(ConsumeCommands::from);
        let commands = futures::stream::iter([ConsumeCommands::from(first)]).chain(rest);
        let queue: Arc<str> = Arc::from(spec.queue.as_str());
        let consumer = spec.consumer.clone();
        let events = self.broker.consume(spec, Box::pin(commands)).await?;
        let responses = events.map(move |event| {
            Ok(match event {
                ConsumeEvent::Failed(e) => return Err(Status::from(e)),
                ConsumeEvent::Jobs(jobs) => {
                    trace::delivered(&queue, &consumer, &jobs);
                    EncodedConsumeResponse {
                        queue: queue.clone(),
                        jobs,
                        errors: Vec::new(),
                    }
                }
                ConsumeEvent::Refused(refused) => EncodedConsumeResponse {
                    queue: queue.clone(),
                    jobs: Vec::new(),
                    errors: refused
                        .into_iter()
                        .map(|(lease_id, e)| convert::settle_error(lease_id, &e))
                        .collect(),
                },
            })
        });
        Ok(Response::new(stream.respond(responses)))
    }

    async fn extend_lease(
        &self,
        request: Request<pb::ExtendLeaseRequest>,
    ) -> Reply<pb::ExtendLeaseResponse> {
        let access = self.access(&request)?;
        let req = request.into_inner();
        let deadline = self
            .broker
            .extend_lease_as(&access, &req.lease_id, req.visibility_timeout_ms)
            .await?;
        Ok(Response::new(pb::ExtendLeaseResponse {
            lease_deadline_unix_ms: deadline,
        }))
    }

    async fn get_job(&self, request: Request<pb::GetJobRequest>) -> Reply<pb::Job> {
        let access = self.access(&request)?;
        let req = request.into_inner();
        let queue = convert::given(req.queue);
        if let Some(queue) = &queue {
            access.check_any(JOB_READERS, "queue", queue)?;
        }
        let (queue, job) = self.broker.get_job(&req.id, queue.as_deref()).await?;
        access.check_any(JOB_READERS, "id", &queue)?;
        Ok(Response::new(convert::job(&queue, job)))
    }

    async fn cancel_job(&self, request: Request<pb::CancelJobRequest>) -> Reply<pb::Job> {
        let access = self.access(&request)?;
        let req = request.into_inner();
        let queue = match convert::given(req.queue) {
            Some(queue) => {
                access.check_any(QUEUE_WRITERS, "queue", &queue)?;
                Some(queue)
            }
            // The job's queue decides the permission: find it before changing anything.
            None if self.auth.is_some() => {
                let (queue, _) = self.broker.get_job(&req.id, None).await?;
                access.check_any(QUEUE_WRITERS, "id", &queue)?;
                Some(queue)
            }
            None => None,
        };
        let (queue, job) = self.broker.cancel_job(&req.id, queue.as_deref()).await?;
        Ok(Response::new(convert::job(&queue, job)))
    }

    async fn delete_job(
        &self,
        request: Request<pb::DeleteJobRequest>,
    ) -> Reply<pb::DeleteJobResponse> {
        let access = self.access(&request)?;
        let req = request.into_inner();
        access.check(Action::Admin, "queue", &req.queue)?;
        let job = self.broker.delete_job(&req.queue, &req.job_id).await?;
        Ok(Response::new(pb::DeleteJobResponse {
            job: Some(convert::job(&req.queue, job)),
        }))
    }

    async fn list_jobs(
        &self,
        request: Request<pb::ListJobsRequest>,
    ) -> Reply<pb::ListJobsResponse> {
        let access = self.access(&request)?;
        let req = request.into_inner();
        access.check(Action::Admin, "queue", &req.queue)?;
        let state = convert::job_state("state", req.state)?;
        let (jobs, next) = self
            .broker
            .list_jobs(&req.queue, state, req.page_size as usize, &req.page_token)
            .await?;
        Ok(Response::new(pb::ListJobsResponse {
            jobs: jobs
                .into_iter()
                .map(|j| convert::job(&req.queue, j))
                .collect(),
            next_page_token: next.map(|n| n.to_string()).unwrap_or_default(),
        }))
    }

    async fn job_history(
        &self,
        request: Request<pb::JobHistoryRequest>,
    ) -> Reply<pb::JobHistoryResponse> {
        let access = self.access(&request)?;
        let req = request.into_inner();
        access.check(Action::Admin, "queue", &req.queue)?;
        let jobs = self
            .broker
            .job_history(&req.queue, req.limit as usize)
            .await?;
        Ok(Response::new(pb::JobHistoryResponse {
            jobs: jobs
                .into_iter()
                .map(|j| convert::job(&req.queue, j))
                .collect(),
        }))
    }

    async fn create_queue(&self, request: Request<pb::CreateQueueRequest>) -> Reply<pb::QueueInfo> {
        let access = self.access(&request)?;
        let req = request.into_inner();
        access.check(Action::Admin, "name", &req.name)?;
        let patch = convert::policy_patch(req.policy, false);
        check_policy_reach(&access, &patch)?;
        let info = self.broker.create_queue(&req.name, patch).await?;
        self.queue_info(info).await
    }

    async fn update_queue(&self, request: Request<pb::UpdateQueueRequest>) -> Reply<pb::QueueInfo> {
        let access = self.access(&request)?;
        let req = request.into_inner();
        access.check(Action::Admin, "name", &req.name)?;
        let patch = convert::policy_patch(req.policy, true);
        check_policy_reach(&access, &patch)?;
        let info = self.broker.update_queue(&req.name, patch).await?;
        self.queue_info(info).await
    }

    async fn purge_queue(
        &self,
        request: Request<pb::PurgeQueueRequest>,
    ) -> Reply<pb::PurgeQueueResponse> {
        let access = self.access(&request)?;
        let name = request.into_inner().name;
        access.check(Action::Admin, "name", &name)?;
        let purged = self.broker.purge_queue(&name).await?;
        Ok(Response::new(pb::PurgeQueueResponse { purged }))
    }

    async fn delete_queue(
        &self,
        request: Request<pb::DeleteQueueRequest>,
    ) -> Reply<pb::DeleteQueueResponse> {
        let access = self.access(&request)?;
        let name = request.into_inner().name;
        access.check(Action::Admin, "name", &name)?;
        self.broker.delete_queue(&name).await?;
        Ok(Response::new(pb::DeleteQueueResponse {}))
    }

    async fn pause_queue(&self, request: Request<pb::PauseQueueRequest>) -> Reply<pb::QueueInfo> {
        let access = self.access(&request)?;
        let name = request.into_inner().name;
        access.check(Action::Admin, "name", &name)?;
        let info = self.broker.set_paused(&name, true).await?;
        self.queue_info(info).await
    }

    async fn resume_queue(&self, request: Request<pb::ResumeQueueRequest>) -> Reply<pb::QueueInfo> {
        let access = self.access(&request)?;
        let name = request.into_inner().name;
        access.check(Action::Admin, "name", &name)?;
        let info = self.broker.set_paused(&name, false).await?;
        self.queue_info(info).await
    }

    async fn redrive(&self, request: Request<pb::RedriveRequest>) -> Reply<pb::RedriveResponse> {
        let access = self.access(&request)?;
        let req = request.into_inner();
        access.check(Action::Admin, "dead_letter_queue", &req.dead_letter_queue)?;
        let outcome = self
            .broker
            .redrive(
                &req.dead_letter_queue,
                &req.job_ids,
                req.rate_per_second,
                req.max_jobs,
                &access,
            )
            .await?;
        Ok(Response::new(outcome.into()))
    }

    async fn list_queues(
        &self,
        request: Request<pb::ListQueuesRequest>,
    ) -> Reply<pb::ListQueuesResponse> {
        let access = self.access(&request)?;
        let mut queues: Vec<pb::QueueInfo> = self
            .broker
            .list_queues()
            .await?
            .into_iter()
            .filter(|q| access.allows_name(Action::Admin, &q.name))
            .map(pb::QueueInfo::from)
            .collect();
        let revisions = self.broker.schema_revisions().await?;
        for q in &mut queues {
            q.schema_revision = revision_of(&revisions, SchemaTarget::queue(&q.name));
        }
        Ok(Response::new(pb::ListQueuesResponse { queues }))
    }

    async fn stats(&self, request: Request<pb::StatsRequest>) -> Reply<pb::StatsResponse> {
        let access = self.access(&request)?;
        let req = request.into_inner();
        check_stats_filter(&access, &req.queues, &req.topics)?;
        // While someone watches, the shared snapshot is at most one tick old: reuse it.
        let mut response = match self.broker.recent_stats() {
            Some(shared) => stats_view(&shared, &req, &access),
            None => stats_view(
                &self.broker.stats(&req.queues, &req.topics).await?,
                &req,
                &access,
            ),
        };
        add_schema_revisions(&mut response, &self.broker.schema_revisions().await?);
        add_schedules(&mut response, &self.broker.list_schedules().await?);
        Ok(Response::new(response))
    }

    type WatchStatsStream = BoxStream<pb::StatsResponse>;

    async fn watch_stats(
        &self,
        request: Request<pb::WatchStatsRequest>,
    ) -> Reply<Self::WatchStatsStream> {
        let credentials = self.credentials(&request)?;
        let access = credentials
            .as_ref()
            .map_or_else(Access::open, Credentials::access);
        let req = request.into_inner();
        let interval_ms = convert::watch_interval_ms(req.interval_ms)?;
        let filter = Arc::new(req.filter.unwrap_or_default());
        check_stats_filter(&access, &filter.queues, &filter.topics)?;
        // Without a filter a watcher sees what its grant in force lets it administer;
        // with one, a reload must leave admin on every name it lists.
        let stream = self.hold_stream(credentials, {
            let filter = filter.clone();
            Box::new(move |access| check_stats_filter(access, &filter.queues, &filter.topics))
        });
        let access = stream.access.clone();
        // Every watcher samples the one shared snapshot at its own interval.
        let mut interval = tokio::time::interval(Duration::from_millis(interval_ms));
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let shutdown = stream.ends_on.clone().cancelled_owned();
        let watch = self.broker.watch_stats();
        let broker = self.broker.clone();
        // Successive frames are at least 90% of the interval apart in `taken_at` (the
        // shared snapshot's ticks jitter a little), so no frame repeats the last one.
        let spacing = interval_ms - interval_ms / 10;
        let snapshots = futures::stream::unfold(
            (interval, watch, 0),
            move |(mut interval, mut watch, last)| {
                let (filter, access, broker) = (filter.clone(), access.clone(), broker.clone());
                async move {
                    interval.tick().await;
                    let due = if last == 0 { 0 } else { last + spacing };
                    let snapshot = watch.taken_since(due).await?;
                    let mut view = stats_view(&snapshot, &filter, &access);
                    // A frame without them rather than none: the counters still stand.
                    match broker.schema_revisions().await {
                        Ok(revisions) => add_schema_revisions(&mut view, &revisions),
                        Err(e) => tracing::warn!(error = %e, "WatchStats: no schema revisions"),
                    }
                    Some((Ok(view), (interval, watch, snapshot.taken_at)))
                }
            },
        )
        .take_until(shutdown);
        Ok(Response::new(stream.respond(snapshots)))
    }

    async fn list_consumers(
        &self,
        request: Request<pb::ListConsumersRequest>,
    ) -> Reply<pb::ListConsumersResponse> {
        let access = self.access(&request)?;
        let req = request.into_inner();
        access.check(Action::Admin, "queue", &req.queue)?;
        let consumers = self.broker.list_consumers(&req.queue).await?;
        Ok(Response::new(pb::ListConsumersResponse {
            consumers: consumers
                .into_iter()
                .map(|(name, c)| convert::consumer_info(&name, c))
                .collect(),
        }))
    }

    // ---- Recurring schedules: every one needs `admin` on the schedule's queue ----------

    async fn create_schedule(&self, request: Request<pb::ScheduleSpec>) -> Reply<pb::ScheduleInfo> {
        let access = self.access(&request)?;
        let spec = convert::schedule_spec(request.into_inner())?;
        access.check(Action::Admin, "job.queue", &spec.template.queue)?;
        let s = self.broker.create_schedule(spec, now_ms()).await?;
        Ok(Response::new((&s).into()))
    }

    async fn update_schedule(&self, request: Request<pb::ScheduleSpec>) -> Reply<pb::ScheduleInfo> {
        let access = self.access(&request)?;
        let spec = convert::schedule_spec(request.into_inner())?;
        access.check(Action::Admin, "job.queue", &spec.template.queue)?;
        self.schedule_admin(&access, &spec.name).await?;
        let s = self.broker.update_schedule(spec, now_ms()).await?;
        Ok(Response::new((&s).into()))
    }

    async fn delete_schedule(
        &self,
        request: Request<pb::DeleteScheduleRequest>,
    ) -> Reply<pb::DeleteScheduleResponse> {
        let access = self.access(&request)?;
        let name = request.into_inner().name;
        self.schedule_admin(&access, &name).await?;
        self.broker.delete_schedule(&name, now_ms()).await?;
        Ok(Response::new(pb::DeleteScheduleResponse {}))
    }

    async fn pause_schedule(
        &self,
        request: Request<pb::PauseScheduleRequest>,
    ) -> Reply<pb::ScheduleInfo> {
        let access = self.access(&request)?;
        self.set_schedule_paused(&access, &request.into_inner().name, true)
            .await
    }

    async fn resume_schedule(
        &self,
        request: Request<pb::ResumeScheduleRequest>,
    ) -> Reply<pb::ScheduleInfo> {
        let access = self.access(&request)?;
        self.set_schedule_paused(&access, &request.into_inner().name, false)
            .await
    }

    async fn list_schedules(
        &self,
        request: Request<pb::ListSchedulesRequest>,
    ) -> Reply<pb::ListSchedulesResponse> {
        let access = self.access(&request)?;
        let queue = request.into_inner().queue;
        if !queue.is_empty() {
            validate_name("queue", &queue)?;
        }
        let schedules = self.broker.list_schedules().await?;
        Ok(Response::new(pb::ListSchedulesResponse {
            schedules: schedules
                .iter()
                .filter(|s| queue.is_empty() || s.spec.template.queue == queue)
                .filter(|s| access.allows_name(Action::Admin, &s.spec.template.queue))
                .map(pb::ScheduleInfo::from)
                .collect(),
        }))
    }

    // ---- Message schemas -------------------------------------------------------------------

    async fn set_schema(
        &self,
        request: Request<pb::SetSchemaRequest>,
    ) -> Reply<pb::SetSchemaResponse> {
        let access = self.access(&request)?;
        let req = request.into_inner();
        let target = schema_target(&access, req.target)?;
        let definition = convert::schema_definition(req.schema)?;
        let (revision, created) = self.broker.set_schema(&target, definition).await?;
        Ok(Response::new(pb::SetSchemaResponse { revision, created }))
    }

    async fn get_schema(
        &self,
        request: Request<pb::GetSchemaRequest>,
    ) -> Reply<pb::GetSchemaResponse> {
        let access = self.access(&request)?;
        let target = schema_target(&access, request.into_inner().target)?;
        let history = self.broker.get_schema(&target).await?;
        Ok(Response::new(pb::GetSchemaResponse::from(history)))
    }

    async fn delete_schema(
        &self,
        request: Request<pb::DeleteSchemaRequest>,
    ) -> Reply<pb::DeleteSchemaResponse> {
        let access = self.access(&request)?;
        let target = schema_target(&access, request.into_inner().target)?;
        let deleted_revision = self.broker.delete_schema(&target).await?;
        Ok(Response::new(pb::DeleteSchemaResponse { deleted_revision }))
    }
}

impl<E: Engine> BrokerService<E> {
    /// PauseSchedule and ResumeSchedule: the grant check, then the change.
    async fn set_schedule_paused(
        &self,
        access: &Access,
        name: &str,
        paused: bool,
    ) -> Reply<pb::ScheduleInfo> {
        self.schedule_admin(access, name).await?;
        let s = self
            .broker
            .set_schedule_paused(name, paused, now_ms())
            .await?;
        Ok(Response::new((&s).into()))
    }

    /// Checks that `access` may administer schedule `name` (`admin` on its queue); an
    /// unknown schedule is NOT_FOUND.
    async fn schedule_admin(&self, access: &Access, name: &str) -> Result<(), BrokerError> {
        validate_name("name", name)?;
        let s = self.broker.get_schedule(name).await?;
        access.check(Action::Admin, "name", &s.spec.template.queue)
    }
}
