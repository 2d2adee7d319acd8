//! The queue's side of recurring schedules: a schedule's state lives in its queue's slot
//! (hash `:sched:<name>`), so one script enqueues a tick's job and records the fire.
//!
//! The hash holds `def` (the definition, encoded as the WAL's `ScheduleDef` without
//! progress) and the progress the scripts change: `rev` (bumped by every change),
//! `last_fire`, `next_fire` ('' for none), `last_job`, `fired`, `skipped_missed`,
//! `skipped_overlap`. Queue deletion leaves it (the next fire creates the queue again).

use redis::Value;
use uuid::Uuid;

use crate::broker::domain::error::BrokerError;
use crate::broker::domain::schedule::{Decision, Overlap, RunState, Schedule};
use crate::broker::engine::redis::conn::unavailable;
use crate::broker::store::{decode_schedule_def, encode_schedule_def};

use super::library::Call;
use super::{QueueKeys, QueueStore, encode_headers, malformed, optional};

/// What a fire did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum FireOutcome {
    /// The decision (or, for a fire, possibly an overlap skip) was applied; the job id of
    /// a fire.
    Applied(Option<Uuid>),
    /// Another node (or a change) moved the schedule on first: nothing was done.
    Stale,
    /// The schedule no longer exists.
    Gone,
}

fn sched_key(queue: &str, name: &str) -> String {
    QueueKeys::new(queue).key(&format!("sched:{name}"))
}

fn num(v: Option<&String>) -> Option<u64> {
    v.filter(|s| !s.is_empty()).and_then(|s| s.parse().ok())
}

impl QueueStore {
    /// The schedule `name` of `queue`, with its progress; `None` if missing.
    pub(crate) async fn schedule_get(
        &self,
        queue: &str,
        name: &str,
    ) -> Result<Option<Schedule>, BrokerError> {
        let mut c = self.conn.clone();
        let fields: std::collections::HashMap<String, Value> = redis::cmd("HGETALL")
            .arg(sched_key(queue, name))
            .query_async(&mut c)
            .await
            .map_err(|e| unavailable("reading a schedule", e))?;
        let Some(Value::BulkString(def)) = fields.get("def") else {
            return Ok(None);
        };
        let mut s = decode_schedule_def(def)
            .ok_or_else(|| malformed("schedule", format!("the definition of schedule {name:?}")))?;
        let text = |k: &str| match fields.get(k) {
            Some(Value::BulkString(b)) => Some(String::from_utf8_lossy(b).into_owned()),
            _ => None,
        };
        s.revision = num(text("rev").as_ref()).unwrap_or(0);
        s.state = RunState {
            last_fire_ms: num(text("last_fire").as_ref()),
            next_fire_ms: num(text("next_fire").as_ref()),
            last_job_id: text("last_job").and_then(|t| Uuid::parse_str(&t).ok()),
            fired: num(text("fired").as_ref()).unwrap_or(0),
            skipped_missed: num(text("skipped_missed").as_ref()).unwrap_or(0),
            skipped_overlap: num(text("skipped_overlap").as_ref()).unwrap_or(0),
        };
        Ok(Some(s))
    }

    /// Writes `s` whole if the stored revision is `expected` (`None`: only if it does not
    /// exist); returns whether it did.
    pub(crate) async fn schedule_put(
        &self,
        s: &Schedule,
        expected: Option<u64>,
    ) -> Result<bool, BrokerError> {
        let queue = &s.spec.template.queue;
        let keys = QueueKeys::new(queue);
        let mut inv = Call::new("schedule_put", keys.base());
        inv.arg(queue)
            .arg(&s.spec.name)
            .arg(expected.map_or_else(String::new, |r| r.to_string()));
        let r = &s.state;
        let opt = |v: Option<u64>| v.map_or_else(String::new, |t| t.to_string());
        inv.arg("def")
            .arg(encode_schedule_def(s))
            .arg("rev")
            .arg(s.revision)
            .arg("last_fire")
            .arg(opt(r.last_fire_ms))
            .arg("next_fire")
            .arg(opt(r.next_fire_ms))
            .arg("last_job")
            .arg(r.last_job_id.map(|id| id.to_string()).unwrap_or_default())
            .arg("fired")
            .arg(r.fired)
            .arg("skipped_missed")
            .arg(r.skipped_missed)
            .arg("skipped_overlap")
            .arg(r.skipped_overlap);
        let done: i64 = self
            .run(&format!("writing schedule {:?}", s.spec.name), None, &inv)
            .await?;
        Ok(done == 1)
    }

    /// Deletes the schedule's state.
    pub(crate) async fn schedule_delete(&self, queue: &str, name: &str) -> Result<(), BrokerError> {
        let mut c = self.conn.clone();
        redis::cmd("DEL")
            .arg(sched_key(queue, name))
            .query_async::<()>(&mut c)
            .await
            .map_err(|e| unavailable("deleting a schedule", e))
    }

    /// Applies `decision` (planned from `s` at its revision) in one script: the job of a
    /// fired tick and the schedule's new progress together, or nothing if the schedule
    /// moved on meanwhile. The queue must exist. `schema_revision` is the queue's schema
    /// the node checked the job with (enqueue.lua refuses it if no longer current).
    pub(crate) async fn schedule_fire(
        &self,
        s: &Schedule,
        decision: Decision,
        schema_revision: u32,
    ) -> Result<FireOutcome, BrokerError> {
        let (what, tick, next) = match decision {
            Decision::Wait => return Ok(FireOutcome::Applied(None)),
            Decision::Fire { tick, next } => ("fire", tick, next),
            Decision::SkipMissed { tick, next } => ("skip_missed", tick, next),
            Decision::SkipOverlap { tick, next } => ("skip_overlap", tick, next),
            Decision::Advance { next } => ("advance", 0, next),
        };
        let queue = &s.spec.template.queue;
        let job = s.job_for(tick);
        let keys = QueueKeys::new(queue);
        let mut inv = Call::new("schedule_fire", keys.base());
        inv.arg(queue)
            .arg(1)
            .arg(Uuid::now_v7().to_string())
            .arg(&job.kind)
            .arg(job.payload.as_ref())
            .arg(encode_headers(&job.headers))
            .arg(job.priority)
            .arg("")
            .arg("")
            .arg(optional(job.idempotency_key.as_deref()))
            .arg(optional(None))
            .arg(schema_revision)
            .arg(&s.spec.name)
            .arg(s.revision)
            .arg(what)
            .arg(tick)
            .arg(next.map_or_else(String::new, |t| t.to_string()))
            .arg(if s.spec.overlap == Overlap::Skip {
                "1"
            } else {
                "0"
            });
        let (outcome, id): (String, String) = self
            .run(&format!("firing schedule {:?}", s.spec.name), None, &inv)
            .await?;
        Ok(match outcome.as_str() {
            "stale" => FireOutcome::Stale,
            "gone" => FireOutcome::Gone,
            _ if id.is_empty() => FireOutcome::Applied(None),
            _ => FireOutcome::Applied(Some(
                Uuid::parse_str(&id).map_err(|e| malformed("schedule fire", e))?,
            )),
        })
    }
}
