//! The WAL records of recurring schedules (`ScheduleDef`, `ScheduleDelete`,
//! `ScheduleFired`, Op fields 40-49) and their conversions from and to the domain's
//! [`Schedule`].

use uuid::Uuid;

use crate::broker::domain::schedule::{
    JobTemplate, MissedTicks, Overlap, RunState, Schedule, ScheduleSpec, Trigger,
};

use super::record::{Batch, Kind, pb};

fn run_to_pb(s: &Schedule) -> pb::ScheduleRun {
    let r = &s.state;
    pb::ScheduleRun {
        last_fire_ms: r.last_fire_ms,
        next_fire_ms: r.next_fire_ms,
        last_job_id: r
            .last_job_id
            .map(|id| bytes::Bytes::copy_from_slice(id.as_bytes()))
            .unwrap_or_default(),
        fired: r.fired,
        skipped_missed: r.skipped_missed,
        skipped_overlap: r.skipped_overlap,
        revision: s.revision,
    }
}

/// Puts a recorded run state into `s`.
pub(crate) fn apply_run(s: &mut Schedule, run: pb::ScheduleRun) {
    s.state = RunState {
        last_fire_ms: run.last_fire_ms,
        next_fire_ms: run.next_fire_ms,
        last_job_id: Uuid::from_slice(&run.last_job_id).ok(),
        fired: run.fired,
        skipped_missed: run.skipped_missed,
        skipped_overlap: run.skipped_overlap,
    };
    s.revision = run.revision;
}

/// The record of a schedule's whole state.
pub(crate) fn schedule_to_pb(s: &Schedule) -> pb::ScheduleDef {
    let (cron_expr, cron_tz, interval_ms) = match &s.spec.trigger {
        Trigger::Cron { expr, tz } => (expr.clone(), tz.clone(), 0),
        Trigger::Interval { every_ms } => (String::new(), String::new(), *every_ms),
    };
    let t = &s.spec.template;
    pb::ScheduleDef {
        name: s.spec.name.clone(),
        cron_expr,
        cron_tz,
        interval_ms,
        queue: t.queue.clone(),
        kind: t.kind.clone(),
        payload: t.payload.clone(),
        headers: t.headers.clone(),
        priority: u32::from(t.priority),
        missed: u32::from(s.spec.missed == MissedTicks::Skip),
        overlap: u32::from(s.spec.overlap == Overlap::Skip),
        paused: s.paused,
        anchor_ms: s.anchor_ms,
        created_ms: s.created_ms,
        run: Some(run_to_pb(s)),
    }
}

/// The schedule a record holds.
pub(crate) fn schedule_from_pb(d: pb::ScheduleDef) -> Schedule {
    let trigger = if d.cron_expr.is_empty() {
        Trigger::Interval {
            every_ms: d.interval_ms,
        }
    } else {
        Trigger::Cron {
            expr: d.cron_expr,
            tz: d.cron_tz,
        }
    };
    let mut s = Schedule {
        spec: ScheduleSpec {
            name: d.name,
            trigger,
            template: JobTemplate {
                queue: d.queue,
                kind: d.kind,
                payload: d.payload,
                headers: d.headers,
                priority: d.priority.min(9) as u8,
            },
            missed: if d.missed == 1 {
                MissedTicks::Skip
            } else {
                MissedTicks::RunOnce
            },
            overlap: if d.overlap == 1 {
                Overlap::Skip
            } else {
                Overlap::Allow
            },
            paused: d.paused,
        },
        paused: d.paused,
        anchor_ms: d.anchor_ms,
        created_ms: d.created_ms,
        revision: 0,
        state: RunState::default(),
    };
    if let Some(run) = d.run {
        apply_run(&mut s, run);
    }
    s
}

/// The op of a schedule's whole state.
pub(crate) fn schedule_def_op(s: &Schedule) -> Kind {
    Kind::ScheduleDef(schedule_to_pb(s))
}

impl Batch {
    /// A schedule created, redefined, paused or resumed.
    pub(crate) fn schedule_def(&mut self, s: &Schedule) {
        if self.is_enabled() {
            self.push(schedule_def_op(s));
        }
    }

    /// A schedule deleted.
    pub(crate) fn schedule_delete(&mut self, name: &str) {
        if self.is_enabled() {
            self.push(Kind::ScheduleDelete(pb::ScheduleDelete {
                name: name.to_owned(),
            }));
        }
    }

    /// A schedule's progress after it fired or skipped a tick.
    pub(crate) fn schedule_fired(&mut self, s: &Schedule) {
        if self.is_enabled() {
            self.push(Kind::ScheduleFired(pb::ScheduleFired {
                name: s.spec.name.clone(),
                run: Some(run_to_pb(s)),
            }));
        }
    }
}

/// A schedule's definition as bytes (its progress left out): how the Redis engine stores
/// it beside the progress fields its scripts change.
pub(crate) fn encode_schedule_def(s: &Schedule) -> Vec<u8> {
    use prost::Message as _;
    pb::ScheduleDef {
        run: None,
        ..schedule_to_pb(s)
    }
    .encode_to_vec()
}

/// The schedule [`encode_schedule_def`] encoded, with no progress; `None` if malformed.
pub(crate) fn decode_schedule_def(bytes: &[u8]) -> Option<Schedule> {
    use prost::Message as _;
    pb::ScheduleDef::decode(bytes).ok().map(schedule_from_pb)
}
