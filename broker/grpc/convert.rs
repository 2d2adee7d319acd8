//! Every conversion between `sluice.v1` messages and domain / engine types, in one place:
//! each enum, policy and stats type is mapped here once, and the service's handlers only
//! call these. Infallible conversions are `From` impls; those that need a field name (for
//! the error) or more than the message are small named functions.
//!
//! proto3 cannot tell an unset scalar from one set to its default, so a default value
//! (0, empty) always means "not given" ([`given`]); the domain's defaults then apply.

use crate::broker::domain::error::BrokerError;
use crate::broker::domain::limits::{
    MAX_DELAY_MS, MAX_WATCH_INTERVAL_MS, check_duration_ms, checked,
};
use crate::broker::domain::names::{Pattern, validate_name};
use crate::broker::domain::queue::{
    Backoff, ConsumerState, Job, JobState, MAX_ATTEMPTS, MAX_PRIORITY, NewJob, QueueCounts,
    QueuePolicy, RateLimit,
};
use crate::broker::domain::schedule::{
    JobTemplate, MissedTicks, Overlap, Schedule, ScheduleSpec, Trigger,
};
use crate::broker::domain::schema::{
    SchemaDefinition, SchemaHistory, SchemaRevision, SchemaTarget,
};
use crate::broker::domain::time::Millis;
use crate::broker::domain::topic::{Appended, NewMessage, Retention};
use crate::broker::engine::local::consume::{ConsumeCommands, NackCommand};
use crate::broker::engine::local::stats::TopicCounts;
use crate::broker::engine::local::subscription::{
    GapPolicy, Start, SubscribeSpec, SubscriptionBatch,
};
use crate::broker::engine::local::{PolicyPatch, QueueInfo, RedriveOutcome, StorageStatus};
use crate::broker::grpc::status;
use crate::broker::grpc::wire::{EncodedSubscribeResponse, ReceivedConsumeRequest};
use crate::pb;

/// A proto3 field's value, or `None` when it holds its type's default (0, `""`, empty
/// bytes), which proto3 sends for a field the client did not set.
pub(super) fn given<T: Default + PartialEq>(value: T) -> Option<T> {
    (value != T::default()).then_some(value)
}

/// The `i`-th job of an Enqueue request, checked against the per-job limits (errors name
/// `jobs[i].<field>`). `now` turns `delay_ms` into a run time.
pub(super) fn new_job(i: usize, spec: pb::JobSpec, now: Millis) -> Result<NewJob, BrokerError> {
    if spec.priority > MAX_PRIORITY as u32 {
        return Err(BrokerError::over_limit(
            format!("jobs[{i}].priority"),
            spec.priority as u64,
            MAX_PRIORITY as u64,
            "",
        ));
    }
    if spec.max_attempts > MAX_ATTEMPTS {
        return Err(BrokerError::over_limit(
            format!("jobs[{i}].max_attempts"),
            spec.max_attempts as u64,
            MAX_ATTEMPTS as u64,
            "",
        ));
    }
    if spec.delay_ms > 0 && spec.run_at_unix_ms > 0 {
        return Err(BrokerError::invalid(
            format!("jobs[{i}].delay_ms"),
            "delay_ms and run_at_unix_ms are exclusive: set one",
        ));
    }
    checked(
        |name| format!("jobs[{i}].{name}"),
        "delay_ms",
        |f| check_duration_ms(f, spec.delay_ms, MAX_DELAY_MS),
    )?;
    if spec.run_at_unix_ms > now + MAX_DELAY_MS {
        return Err(BrokerError::invalid(
            format!("jobs[{i}].run_at_unix_ms"),
            format!(
                "{} is more than {MAX_DELAY_MS} ms in the future",
                spec.run_at_unix_ms
            ),
        ));
    }
    let run_at = if spec.delay_ms > 0 {
        Some(now + spec.delay_ms)
    } else if spec.run_at_unix_ms > 0 {
        Some(spec.run_at_unix_ms)
    } else {
        None
    };
    Ok(NewJob {
        payload: spec.payload,
        headers: spec.headers,
        kind: spec.kind,
        priority: spec.priority as u8,
        run_at,
        max_attempts: given(spec.max_attempts),
        idempotency_key: given(spec.idempotency_key),
        ordering_key: given(spec.ordering_key),
    })
}

impl From<JobState> for pb::JobState {
    fn from(state: JobState) -> Self {
        match state {
            JobState::Scheduled => Self::Scheduled,
            JobState::Pending => Self::Pending,
            JobState::Leased => Self::Leased,
            JobState::Retrying => Self::Retrying,
            JobState::Completed => Self::Completed,
            JobState::Dead => Self::Dead,
            JobState::Cancelled => Self::Cancelled,
        }
    }
}

/// The state a request's `field` names: `None` for `JOB_STATE_UNSPECIFIED`, an error for a
/// value that is no `JobState`. The inverse of the `From` above, found through it so the
/// mapping is written once.
pub(super) fn job_state(field: &str, value: i32) -> Result<Option<JobState>, BrokerError> {
    if value == pb::JobState::Unspecified as i32 {
        return Ok(None);
    }
    JobState::ALL
        .into_iter()
        .find(|s| pb::JobState::from(*s) as i32 == value)
        .map(Some)
        .ok_or_else(|| BrokerError::invalid(field, format!("{value} is not a JobState")))
}

/// A job of `queue` as GetJob, ListJobs and the others show it.
pub(super) fn job(queue: &str, job: Job) -> pb::Job {
    pb::Job {
        id: job.id.to_string(),
        queue: queue.to_owned(),
        kind: job.kind,
        state: pb::JobState::from(job.state) as i32,
        priority: job.priority as u32,
        attempts: job.attempts,
        max_attempts: job.max_attempts,
        payload: job.payload,
        headers: job.headers,
        idempotency_key: job.idempotency_key.unwrap_or_default(),
        ordering_key: job.ordering_key.map(|k| k.to_string()).unwrap_or_default(),
        enqueued_at_unix_ms: job.enqueued_at,
        run_at_unix_ms: job.run_at,
        updated_at_unix_ms: job.updated_at,
        finished_at_unix_ms: job.finished_at.unwrap_or(0),
        lease_deadline_unix_ms: job.lease_deadline.unwrap_or(0),
        consumer: job.consumer.map(|c| c.to_string()).unwrap_or_default(),
        last_error: job.last_error.unwrap_or_default(),
        result: job.result.unwrap_or_default(),
        dead_letter_queue: job.dead_letter_queue.unwrap_or_default(),
    }
}

/// The transport form of a batch: messages are written from their shared wire caches
/// (see [`crate::broker::grpc::wire`]).
impl From<SubscriptionBatch> for EncodedSubscribeResponse {
    fn from(batch: SubscriptionBatch) -> Self {
        let gaps = batch
            .gaps
            .into_iter()
            .map(|g| pb::Gap {
                topic: g.topic.to_string(),
                first_missing: g.first_missing,
                next_available: g.next_available,
            })
            .collect();
        Self::new(batch.messages, gaps)
    }
}

/// The changes a CreateQueue (`for_update` false) or UpdateQueue request's policy asks
/// for. Unset fields change nothing (a new queue keeps its default); an exponential
/// backoff with one bound set gets the default of the other.
pub(super) fn policy_patch(p: Option<pb::QueuePolicy>, for_update: bool) -> PolicyPatch {
    let Some(p) = p else {
        return PolicyPatch::default();
    };
    let backoff = p.backoff.and_then(|b| {
        if !b.delays_ms.is_empty() {
            Some(Backoff::Schedule(b.delays_ms))
        } else if b.initial_ms > 0 || b.max_ms > 0 || b.no_jitter {
            Some(Backoff::Exponential {
                initial_ms: given(b.initial_ms).unwrap_or(Backoff::DEFAULT_INITIAL_MS),
                max_ms: given(b.max_ms).unwrap_or(Backoff::DEFAULT_MAX_MS),
                jitter: !b.no_jitter,
            })
        } else {
            None
        }
    });
    let bindings = if !for_update || p.replace_bindings || !p.topic_bindings.is_empty() {
        Some(p.topic_bindings)
    } else {
        None
    };
    PolicyPatch {
        visibility_timeout_ms: given(p.visibility_timeout_ms),
        max_attempts: given(p.max_attempts),
        backoff,
        dead_letter_queue: given(p.dead_letter_queue),
        max_depth: given(p.max_depth),
        dedup_window_ms: given(p.dedup_window_ms),
        topic_bindings: bindings.filter(|b| for_update || !b.is_empty()),
        history_limit: given(p.history_limit),
        rate_limit: p.rate_limit.map(|r| RateLimit {
            per_second: r.per_second,
            burst: r.burst,
        }),
        max_in_flight: p.max_in_flight,
    }
}

impl From<&QueuePolicy> for pb::QueuePolicy {
    fn from(p: &QueuePolicy) -> Self {
        let backoff = match &p.backoff {
            Backoff::Schedule(d) => pb::BackoffPolicy {
                delays_ms: d.clone(),
                ..Default::default()
            },
            Backoff::Exponential {
                initial_ms,
                max_ms,
                jitter,
            } => pb::BackoffPolicy {
                initial_ms: *initial_ms,
                max_ms: *max_ms,
                delays_ms: Vec::new(),
                no_jitter: !jitter,
            },
        };
        Self {
            visibility_timeout_ms: p.visibility_timeout_ms,
            max_attempts: p.max_attempts,
            backoff: Some(backoff),
            dead_letter_queue: p.dead_letter_queue.clone(),
            max_depth: p.max_depth,
            dedup_window_ms: p.dedup_window_ms,
            topic_bindings: p.topic_bindings.clone(),
            history_limit: p.history_limit,
            replace_bindings: false,
            rate_limit: p.rate_limit.map(|r| pb::RateLimit {
                per_second: r.per_second,
                burst: r.burst,
            }),
            max_in_flight: p.max_in_flight,
        }
    }
}

impl From<QueueInfo> for pb::QueueInfo {
    fn from(info: QueueInfo) -> Self {
        Self {
            policy: Some(pb::QueuePolicy::from(&info.policy)),
            name: info.name,
            paused: info.paused,
            // Filled in by ListQueues from the engine's schema revisions.
            schema_revision: 0,
        }
    }
}

/// A CreateTopic request's retention: each unset limit is the default's.
impl From<pb::RetentionPolicy> for Retention {
    fn from(r: pb::RetentionPolicy) -> Self {
        let defaults = Retention::default();
        Self {
            max_messages: given(r.max_messages).unwrap_or(defaults.max_messages),
            max_bytes: given(r.max_bytes).unwrap_or(defaults.max_bytes),
            max_age_ms: given(r.max_age_ms).unwrap_or(defaults.max_age_ms),
        }
    }
}

impl From<Retention> for pb::RetentionPolicy {
    fn from(r: Retention) -> Self {
        Self {
            max_messages: r.max_messages,
            max_bytes: r.max_bytes,
            max_age_ms: r.max_age_ms,
        }
    }
}

/// One queue's row of a Stats response.
pub(super) fn queue_stats(name: &str, c: &QueueCounts) -> pb::QueueStats {
    pb::QueueStats {
        name: name.to_owned(),
        pending: c.pending,
        scheduled: c.scheduled,
        leased: c.leased,
        retrying: c.retrying,
        completed: c.completed,
        failed: c.failed,
        dead: c.dead,
        cancelled: c.cancelled,
        oldest_pending_age_ms: c.oldest_pending_age_ms,
        enqueue_rate: c.enqueue_rate,
        ack_rate: c.ack_rate,
        consumers: c.consumers,
        paused: c.paused,
        enqueued: c.enqueued,
        max_in_flight: c.max_in_flight,
        rate_limit_per_second: c.rate_limit_per_second,
        rate_limit_burst: c.rate_limit_burst,
        rate_tokens: c.rate_tokens,
        rate_limited_ms: c.rate_limited_ms,
        in_flight_limited_ms: c.in_flight_limited_ms,
        created_by_consumer: c.created_by_consumer,
        // Filled in by Stats from the engine's schema revisions.
        schema_revision: 0,
    }
}

impl From<&TopicCounts> for pb::TopicStats {
    fn from(t: &TopicCounts) -> Self {
        Self {
            name: t.name.clone(),
            first_sequence: t.first_sequence,
            last_sequence: t.last_sequence,
            retained_messages: t.retained_messages,
            retained_bytes: t.retained_bytes,
            subscribers: t.subscribers,
            gaps: t.gaps,
            publish_rate: t.publish_rate,
            published: t.published,
            // Filled in by Stats from the engine's schema revisions.
            schema_revision: 0,
        }
    }
}

impl From<&StorageStatus> for pb::StorageStats {
    fn from(s: &StorageStatus) -> Self {
        Self {
            engine: s.engine.to_owned(),
            fsync: s.fsync.clone().unwrap_or_default(),
            failed: s.failure.is_some(),
            failure_reason: s.failure.clone().unwrap_or_default(),
            recovery: Some(pb::RecoveryStats {
                torn_tail_bytes: s.recovery.torn_tail_bytes,
                torn_tail_records: s.recovery.torn_tail_records,
                files_repaired: s.recovery.files_repaired,
                missing_files: s.recovery.missing.clone(),
                records_replayed: s.recovery.entries,
            }),
        }
    }
}

/// A WatchStats request's interval: 0 is the default, 1 s; below 100 ms is refused.
pub(super) fn watch_interval_ms(value: u32) -> Result<u64, BrokerError> {
    match value {
        0 => Ok(1_000),
        v if v < 100 => Err(BrokerError::invalid(
            "interval_ms",
            format!("{v} ms is below the minimum of 100 ms"),
        )),
        v => {
            check_duration_ms("interval_ms", v.into(), MAX_WATCH_INTERVAL_MS)?;
            Ok(v.into())
        }
    }
}

/// One worker of a ListConsumers response.
pub(super) fn consumer_info(name: &str, c: ConsumerState) -> pb::ConsumerInfo {
    pb::ConsumerInfo {
        name: name.to_owned(),
        address: c.address,
        leases_held: c.leases_held,
        last_seen_unix_ms: c.last_seen,
        done: c.done,
        failed: c.failed,
    }
}

impl From<ReceivedConsumeRequest> for ConsumeCommands {
    fn from(r: ReceivedConsumeRequest) -> Self {
        Self {
            credits: r.credits,
            acks: r
                .acks
                .into_iter()
                .map(|a| (a.lease_id, given(a.result)))
                .collect(),
            nacks: r
                .nacks
                .into_iter()
                .map(|n| NackCommand {
                    lease_id: n.lease_id,
                    error: n.error,
                    retry_delay_ms: given(n.retry_delay_ms),
                    dead_letter: n.dead_letter,
                })
                .collect(),
            extends: r
                .extends
                .into_iter()
                .map(|e| (e.lease_id, e.visibility_timeout_ms))
                .collect(),
            stop: r.stop,
        }
    }
}

impl From<pb::PublishMessage> for NewMessage {
    fn from(m: pb::PublishMessage) -> Self {
        Self {
            payload: m.payload,
            headers: m.headers,
            key: m.key,
            idempotency_key: given(m.idempotency_key),
        }
    }
}

/// A Publish request's results, one per message in order.
pub(super) fn publish_results(results: Vec<Appended>) -> Vec<pb::PublishResult> {
    results
        .into_iter()
        .map(|r| pb::PublishResult {
            sequence: r.sequence,
            duplicate: r.duplicate,
        })
        .collect()
}

/// A Subscribe request as the engine takes it, with its `pattern` already parsed (and
/// authorized). `max_batch_limit` is the most messages per batch, and the default.
pub(super) fn subscribe_spec(
    req: pb::SubscribeRequest,
    pattern: Pattern,
    max_batch_limit: usize,
) -> Result<SubscribeSpec, BrokerError> {
    let start = start(&req)?;
    let on_gap = gap_policy(req.on_gap)?;
    if req.max_batch as usize > max_batch_limit {
        return Err(BrokerError::over_limit(
            "max_batch",
            req.max_batch as u64,
            max_batch_limit as u64,
            "messages",
        ));
    }
    for topic in req.resume_from.keys() {
        validate_name("resume_from", topic)?;
    }
    Ok(SubscribeSpec {
        pattern,
        start,
        resume_from: req.resume_from.into_iter().collect(),
        on_gap,
        max_batch: if req.max_batch == 0 {
            max_batch_limit
        } else {
            req.max_batch as usize
        },
    })
}

/// Where a Subscribe request starts in the topics it matches.
fn start(req: &pb::SubscribeRequest) -> Result<Start, BrokerError> {
    match pb::StartPosition::try_from(req.start) {
        Ok(pb::StartPosition::Unspecified | pb::StartPosition::Latest) => Ok(Start::Latest),
        Ok(pb::StartPosition::Earliest) => Ok(Start::Earliest),
        Ok(pb::StartPosition::Sequence) => Ok(Start::Sequence(req.start_sequence)),
        Ok(pb::StartPosition::Time) => Ok(Start::Time(req.start_time_unix_ms)),
        Err(_) => Err(BrokerError::invalid(
            "start",
            format!("{} is not a StartPosition", req.start),
        )),
    }
}

/// A Subscribe request's `on_gap`.
fn gap_policy(value: i32) -> Result<GapPolicy, BrokerError> {
    match pb::GapPolicy::try_from(value) {
        Ok(pb::GapPolicy::Unspecified | pb::GapPolicy::Notify) => Ok(GapPolicy::Notify),
        Ok(pb::GapPolicy::EndStream) => Ok(GapPolicy::EndStream),
        Err(_) => Err(BrokerError::invalid(
            "on_gap",
            format!("{value} is not a GapPolicy"),
        )),
    }
}

/// A refusal reported inside a stream's response rather than as the stream's status: the
/// code and text the unary call's status would carry.
impl From<&BrokerError> for pb::Refusal {
    fn from(e: &BrokerError) -> Self {
        Self {
            code: status::code(e) as i32,
            message: e.to_string(),
        }
    }
}

/// A consume stream's refused settlement of `lease_id`.
pub(super) fn settle_error(lease_id: String, e: &BrokerError) -> pb::SettleError {
    let pb::Refusal { code, message } = e.into();
    pb::SettleError {
        lease_id,
        code,
        message,
    }
}

impl From<RedriveOutcome> for pb::RedriveResponse {
    fn from(outcome: RedriveOutcome) -> Self {
        Self {
            redriven: outcome.redriven,
            skipped_ids: outcome.skipped.iter().map(|u| u.to_string()).collect(),
        }
    }
}

// ---- Recurring schedules --------------------------------------------------------------

/// A CreateSchedule / UpdateSchedule request as the domain's definition; errors name the
/// request field (`cron.time_zone`, `job.priority`, ...).
pub(super) fn schedule_spec(spec: pb::ScheduleSpec) -> Result<ScheduleSpec, BrokerError> {
    let trigger = match spec.trigger {
        Some(pb::schedule_spec::Trigger::Cron(c)) => Trigger::Cron {
            expr: c.expression,
            tz: if c.time_zone.is_empty() {
                "UTC".to_owned()
            } else {
                c.time_zone
            },
        },
        Some(pb::schedule_spec::Trigger::IntervalMs(every_ms)) => Trigger::Interval { every_ms },
        None => {
            return Err(BrokerError::invalid(
                "trigger",
                "set one of `cron` (an expression and a time zone) or `interval_ms`",
            ));
        }
    };
    let job = spec.job.unwrap_or_default();
    if job.priority > MAX_PRIORITY as u32 {
        return Err(BrokerError::over_limit(
            "job.priority",
            u64::from(job.priority),
            MAX_PRIORITY as u64,
            "",
        ));
    }
    let missed = match pb::MissedTickPolicy::try_from(spec.missed_ticks) {
        Ok(pb::MissedTickPolicy::Unspecified | pb::MissedTickPolicy::RunOnce) => {
            MissedTicks::RunOnce
        }
        Ok(pb::MissedTickPolicy::Skip) => MissedTicks::Skip,
        Err(_) => {
            return Err(BrokerError::invalid(
                "missed_ticks",
                format!("{} is not a MissedTickPolicy", spec.missed_ticks),
            ));
        }
    };
    let overlap = match pb::OverlapPolicy::try_from(spec.overlap) {
        Ok(pb::OverlapPolicy::Unspecified | pb::OverlapPolicy::Allow) => Overlap::Allow,
        Ok(pb::OverlapPolicy::Skip) => Overlap::Skip,
        Err(_) => {
            return Err(BrokerError::invalid(
                "overlap",
                format!("{} is not an OverlapPolicy", spec.overlap),
            ));
        }
    };
    Ok(ScheduleSpec {
        name: spec.name,
        trigger,
        template: JobTemplate {
            queue: job.queue,
            kind: job.kind,
            payload: job.payload,
            headers: job.headers,
            priority: job.priority as u8,
        },
        missed,
        overlap,
        paused: spec.paused,
    })
}

impl From<&Schedule> for pb::ScheduleInfo {
    fn from(s: &Schedule) -> Self {
        let trigger = match &s.spec.trigger {
            Trigger::Cron { expr, tz } => pb::schedule_spec::Trigger::Cron(pb::CronTrigger {
                expression: expr.clone(),
                time_zone: tz.clone(),
            }),
            Trigger::Interval { every_ms } => pb::schedule_spec::Trigger::IntervalMs(*every_ms),
        };
        let t = &s.spec.template;
        let spec = pb::ScheduleSpec {
            name: s.spec.name.clone(),
            trigger: Some(trigger),
            job: Some(pb::ScheduleJob {
                queue: t.queue.clone(),
                kind: t.kind.clone(),
                payload: t.payload.clone(),
                headers: t.headers.clone(),
                priority: u32::from(t.priority),
            }),
            missed_ticks: match s.spec.missed {
                MissedTicks::RunOnce => pb::MissedTickPolicy::RunOnce,
                MissedTicks::Skip => pb::MissedTickPolicy::Skip,
            } as i32,
            overlap: match s.spec.overlap {
                Overlap::Allow => pb::OverlapPolicy::Allow,
                Overlap::Skip => pb::OverlapPolicy::Skip,
            } as i32,
            paused: s.paused,
        };
        let r = &s.state;
        pb::ScheduleInfo {
            schedule: Some(spec),
            last_fire_unix_ms: r.last_fire_ms.unwrap_or(0),
            next_fire_unix_ms: if s.paused {
                0
            } else {
                r.next_fire_ms.unwrap_or(0)
            },
            last_job_id: r.last_job_id.map(|id| id.to_string()).unwrap_or_default(),
            fired: r.fired,
            skipped_missed: r.skipped_missed,
            skipped_overlap: r.skipped_overlap,
            created_unix_ms: s.created_ms,
        }
    }
}

// ---- Message schemas ------------------------------------------------------------------------

/// A schema request's target, its name checked.
pub(super) fn schema_target(target: Option<pb::SchemaTarget>) -> Result<SchemaTarget, BrokerError> {
    use pb::schema_target::Target;
    match target.and_then(|t| t.target) {
        Some(Target::Queue(name)) => {
            validate_name("target.queue", &name)?;
            Ok(SchemaTarget::queue(&name))
        }
        Some(Target::Topic(name)) => {
            validate_name("target.topic", &name)?;
            Ok(SchemaTarget::topic(&name))
        }
        None => Err(BrokerError::invalid(
            "target",
            "must name a queue (`queue`) or a topic (`topic`)",
        )),
    }
}

/// A SetSchema request's schema.
pub(super) fn schema_definition(
    schema: Option<pb::set_schema_request::Schema>,
) -> Result<SchemaDefinition, BrokerError> {
    use pb::set_schema_request::Schema;
    match schema {
        Some(Schema::JsonSchema(j)) => Ok(SchemaDefinition::JsonSchema { text: j.text }),
        Some(Schema::Protobuf(p)) => Ok(SchemaDefinition::Protobuf {
            descriptor_set: p.descriptor_set,
            message_type: p.message_type,
        }),
        None => Err(BrokerError::invalid(
            "schema",
            "must be set: `json_schema` or `protobuf`",
        )),
    }
}

impl From<SchemaRevision> for pb::SchemaRevision {
    fn from(r: SchemaRevision) -> Self {
        use pb::schema_revision::Schema;
        Self {
            revision: r.revision,
            created_unix_ms: r.created_at,
            schema: Some(match r.definition {
                SchemaDefinition::JsonSchema { text } => {
                    Schema::JsonSchema(pb::JsonSchema { text })
                }
                SchemaDefinition::Protobuf {
                    descriptor_set,
                    message_type,
                } => Schema::Protobuf(pb::ProtobufSchema {
                    descriptor_set,
                    message_type,
                }),
            }),
        }
    }
}

impl From<SchemaHistory> for pb::GetSchemaResponse {
    fn from(h: SchemaHistory) -> Self {
        Self {
            current_revision: h.current,
            history: h
                .revisions
                .into_iter()
                .map(pb::SchemaRevision::from)
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_api_job_state_maps_to_a_domain_state_and_back() {
        assert_eq!(job_state("state", 0).unwrap(), None);
        let api: Vec<pb::JobState> = (1..)
            .map_while(|value| pb::JobState::try_from(value).ok())
            .collect();
        assert_eq!(api.len(), JobState::ALL.len());
        for state in api {
            let domain = job_state("state", state as i32)
                .unwrap()
                .expect("not unspecified");
            assert_eq!(pb::JobState::from(domain), state);
        }
        let err = job_state("state", 8).unwrap_err();
        assert_eq!(err.to_string(), "state: 8 is not a JobState");
    }

    #[test]
    fn an_exponential_backoff_with_one_bound_gets_the_default_other() {
        let backoff = |b: pb::BackoffPolicy| {
            let policy = pb::QueuePolicy {
                backoff: Some(b),
                ..Default::default()
            };
            policy_patch(Some(policy), true).backoff
        };
        assert_eq!(
            backoff(pb::BackoffPolicy {
                initial_ms: 50,
                ..Default::default()
            }),
            Some(Backoff::Exponential {
                initial_ms: 50,
                max_ms: Backoff::DEFAULT_MAX_MS,
                jitter: true,
            })
        );
        assert_eq!(
            backoff(pb::BackoffPolicy {
                no_jitter: true,
                ..Default::default()
            }),
            Some(Backoff::Exponential {
                initial_ms: Backoff::DEFAULT_INITIAL_MS,
                max_ms: Backoff::DEFAULT_MAX_MS,
                jitter: false,
            })
        );
        assert_eq!(backoff(pb::BackoffPolicy::default()), None);
    }
}
