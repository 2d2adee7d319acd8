//! Schedules driven with explicit times: no test sleeps.

use chrono::{TimeZone, Utc};

use super::*;

const S: Millis = 1_000;
const MIN: Millis = 60 * S;
const HOUR: Millis = 60 * MIN;

fn utc(y: i32, mo: u32, d: u32, h: u32, mi: u32) -> Millis {
    Utc.with_ymd_and_hms(y, mo, d, h, mi, 0)
        .single()
        .expect("valid date")
        .timestamp_millis() as Millis
}

fn spec(name: &str, trigger: Trigger) -> ScheduleSpec {
    ScheduleSpec {
        name: name.to_owned(),
        trigger,
        template: JobTemplate {
            queue: "jobs".to_owned(),
            kind: "tick".to_owned(),
            payload: Bytes::from_static(b"x"),
            headers: Headers::new(),
            priority: 3,
        },
        missed: MissedTicks::RunOnce,
        overlap: Overlap::Allow,
        paused: false,
    }
}

fn cron(expr: &str, tz: &str) -> Trigger {
    Trigger::Cron {
        expr: expr.to_owned(),
        tz: tz.to_owned(),
    }
}

fn every(ms: u64) -> Trigger {
    Trigger::Interval { every_ms: ms }
}

/// The ticks a schedule created at `from` reaches, in order, up to `n`.
fn ticks(s: &Schedule, from: Millis, n: usize) -> Vec<Millis> {
    let mut out = Vec::new();
    let mut t = from;
    while out.len() < n {
        t = s.next_after(t).expect("a next tick");
        out.push(t);
    }
    out
}

/// Runs the scheduler at `now` as an engine would, with no job running.
fn step(s: &mut Schedule, now: Millis) -> Decision {
    let d = s.plan(now, false);
    let job = matches!(d, Decision::Fire { .. }).then(Uuid::new_v4);
    s.record(d, job);
    d
}

#[test]
fn interval_ticks_are_anchored_at_creation() {
    let t0 = 1_000_000 + 123;
    let s = Schedule::new(spec("a", every(10 * S)), t0);
    assert_eq!(s.state.next_fire_ms, Some(t0 + 10 * S));
    assert_eq!(
        ticks(&s, t0, 3),
        vec![t0 + 10 * S, t0 + 20 * S, t0 + 30 * S]
    );
    // From the middle of a period, and from exactly a tick.
    assert_eq!(s.next_after(t0 + 15 * S), Some(t0 + 20 * S));
    assert_eq!(s.next_after(t0 + 20 * S), Some(t0 + 30 * S));
    assert_eq!(s.latest_at(t0 + 25 * S), Some(t0 + 20 * S));
    assert_eq!(s.latest_at(t0 + 5 * S), None);
}

#[test]
fn a_due_tick_fires_once_then_waits_for_the_next() {
    let t0 = 5_000_000;
    let mut s = Schedule::new(spec("a", every(10 * S)), t0);
    assert_eq!(s.plan(t0 + 9 * S, false), Decision::Wait);
    let d = step(&mut s, t0 + 10 * S + 7);
    assert_eq!(
        d,
        Decision::Fire {
            tick: t0 + 10 * S,
            next: Some(t0 + 20 * S)
        }
    );
    assert_eq!(s.state.last_fire_ms, Some(t0 + 10 * S));
    assert_eq!(s.state.fired, 1);
    assert!(s.state.last_job_id.is_some());
    // Looking again at the same moment (another node, a retry) fires nothing.
    assert_eq!(s.plan(t0 + 10 * S + 8, false), Decision::Wait);
}

#[test]
fn a_tick_at_or_before_the_last_fire_never_fires_again() {
    let t0 = 5_000_000;
    let mut s = Schedule::new(spec("a", every(10 * S)), t0);
    step(&mut s, t0 + 10 * S);
    // A restored state whose next tick went stale (e.g. the clock stepped back).
    s.state.next_fire_ms = Some(t0 + 10 * S);
    assert_eq!(
        s.plan(t0 + 10 * S, false),
        Decision::Advance {
            next: Some(t0 + 20 * S)
        }
    );
}

#[test]
fn ticks_within_grace_of_a_restart_still_fire_under_skip() {
    let t0 = 5_000_000;
    let mut sp = spec("a", every(10 * S));
    sp.missed = MissedTicks::Skip;
    let mut s = Schedule::new(sp, t0);
    // Down across the tick; back 3 s later (under MISSED_GRACE_MS).
    assert!(
        matches!(step(&mut s, t0 + 13 * S), Decision::Fire { tick, .. } if tick == t0 + 10 * S)
    );
}

#[test]
fn missed_ticks_after_a_long_gap_run_once_for_the_latest() {
    let t0 = 5_000_000;
    let mut s = Schedule::new(spec("a", every(10 * S)), t0);
    // Down for an hour: 360 ticks missed.
    let now = t0 + HOUR + 7 * S;
    assert_eq!(
        step(&mut s, now),
        Decision::Fire {
            tick: t0 + HOUR,
            next: Some(t0 + HOUR + 10 * S)
        }
    );
    assert_eq!(s.state.fired, 1);
    // And nothing more until the next tick.
    assert_eq!(s.plan(now + S, false), Decision::Wait);
}

#[test]
fn missed_ticks_after_a_long_gap_are_skipped_under_skip() {
    let t0 = 5_000_000;
    let mut sp = spec("a", every(10 * S));
    sp.missed = MissedTicks::Skip;
    let mut s = Schedule::new(sp, t0);
    let now = t0 + HOUR + 7 * S;
    assert_eq!(
        step(&mut s, now),
        Decision::SkipMissed {
            tick: t0 + HOUR,
            next: Some(t0 + HOUR + 10 * S)
        }
    );
    assert_eq!((s.state.fired, s.state.skipped_missed), (0, 1));
    assert_eq!(s.state.last_job_id, None);
    // The next tick, on time, fires.
    assert!(matches!(
        step(&mut s, t0 + HOUR + 10 * S),
        Decision::Fire { .. }
    ));
}

#[test]
fn an_older_tick_is_missed_when_a_newer_one_is_due_even_within_grace() {
    let t0 = 5_000_000;
    let mut sp = spec("a", every(2 * S));
    sp.missed = MissedTicks::Skip;
    let mut s = Schedule::new(sp, t0);
    // Ticks t0+2s and t0+4s are both due at t0+4.5s: only the newer fires (it is on time).
    assert_eq!(
        step(&mut s, t0 + 4 * S + 500),
        Decision::Fire {
            tick: t0 + 4 * S,
            next: Some(t0 + 6 * S)
        }
    );
    assert_eq!(s.state.fired, 1);
}

#[test]
fn overlap_skip_skips_while_the_previous_job_runs() {
    let t0 = 5_000_000;
    let mut sp = spec("a", every(10 * S));
    sp.overlap = Overlap::Skip;
    let mut s = Schedule::new(sp, t0);
    // The first tick has no previous job: it fires whatever `previous_running` says.
    let d = s.plan(t0 + 10 * S, true);
    assert!(matches!(d, Decision::Fire { .. }));
    s.record(d, Some(Uuid::new_v4()));
    let d = s.plan(t0 + 20 * S, true);
    assert_eq!(
        d,
        Decision::SkipOverlap {
            tick: t0 + 20 * S,
            next: Some(t0 + 30 * S)
        }
    );
    s.record(d, None);
    assert_eq!(s.state.skipped_overlap, 1);
    // Finished: the next tick fires.
    assert!(matches!(s.plan(t0 + 30 * S, false), Decision::Fire { .. }));
    // Overlap allowed: fires even while the previous runs.
    let mut s2 = Schedule::new(spec("b", every(10 * S)), t0);
    s2.state.last_job_id = Some(Uuid::new_v4());
    assert!(matches!(s2.plan(t0 + 10 * S, true), Decision::Fire { .. }));
}

#[test]
fn cron_in_a_zone_follows_daylight_saving_time() {
    // 09:00 in Paris is 08:00 UTC in winter and 07:00 UTC in summer; DST starts on
    // 29 March 2026.
    let s = Schedule::new(
        spec("a", cron("0 9 * * *", "Europe/Paris")),
        utc(2026, 3, 27, 12, 0),
    );
    assert_eq!(
        ticks(&s, utc(2026, 3, 27, 12, 0), 3),
        vec![
            utc(2026, 3, 28, 8, 0),
            utc(2026, 3, 29, 7, 0),
            utc(2026, 3, 30, 7, 0)
        ]
    );
}

#[test]
fn cron_hourly_across_the_autumn_fold_ticks_every_real_hour_once() {
    // On 25 October 2026 Paris goes from 03:00 CEST back to 02:00 CET: the hour 02:xx
    // happens twice. An hourly schedule still ticks once per real hour, never twice at one
    // instant and never with a gap.
    let from = utc(2026, 10, 24, 22, 30);
    let s = Schedule::new(spec("a", cron("0 * * * *", "Europe/Paris")), from);
    let got = ticks(&s, from, 6);
    for w in got.windows(2) {
        assert_eq!(w[1] - w[0], HOUR, "ticks {got:?}");
    }
    assert_eq!(got[0], utc(2026, 10, 24, 23, 0));
}

#[test]
fn cron_in_the_spring_gap_fires_once_that_day() {
    // 02:30 does not exist in Paris on 29 March 2026 (02:00 jumps to 03:00): the job runs
    // once that day, not zero times and not twice.
    let from = utc(2026, 3, 28, 12, 0);
    let s = Schedule::new(spec("a", cron("30 2 * * *", "Europe/Paris")), from);
    let got = ticks(&s, from, 2);
    assert!(
        got[0] >= utc(2026, 3, 29, 0, 0) && got[0] < utc(2026, 3, 29, 2, 0),
        "{got:?}"
    );
    assert_eq!(got[1], utc(2026, 3, 30, 0, 30));
}

#[test]
fn cron_latest_tick_and_missed_run_once() {
    let created = utc(2026, 1, 1, 0, 0);
    let mut s = Schedule::new(spec("a", cron("*/15 * * * *", "UTC")), created);
    assert_eq!(s.state.next_fire_ms, Some(utc(2026, 1, 1, 0, 15)));
    // Down until 03:07: one job, for 03:00.
    assert_eq!(
        step(&mut s, utc(2026, 1, 1, 3, 7)),
        Decision::Fire {
            tick: utc(2026, 1, 1, 3, 0),
            next: Some(utc(2026, 1, 1, 3, 15))
        }
    );
}

#[test]
fn the_job_carries_the_tick_header_and_key() {
    let s = Schedule::new(spec("nightly", every(10 * S)), 0);
    let tick = utc(2026, 12, 6, 20, 0) + 250;
    let job = s.job_for(tick);
    assert_eq!(job.headers[HEADER_SCHEDULE], "nightly");
    assert_eq!(
        job.headers[HEADER_SCHEDULE_TICK],
        "2026-12-06T20:00:00.250Z"
    );
    assert_eq!(
        job.idempotency_key.as_deref(),
        Some(format!("schedule:nightly:{tick}").as_str())
    );
    assert_eq!((job.kind.as_str(), job.priority), ("tick", 3));
}

#[test]
fn pause_holds_and_resume_starts_after_now() {
    let t0 = 5_000_000;
    let mut s = Schedule::new(spec("a", every(10 * S)), t0);
    s.set_paused(true, t0 + S);
    assert_eq!(s.plan(t0 + 100 * S, false), Decision::Wait);
    s.set_paused(false, t0 + 105 * S);
    assert_eq!(s.state.next_fire_ms, Some(t0 + 110 * S));
}

#[test]
fn redefining_the_trigger_reanchors_and_the_queue_cannot_change() {
    let t0 = 5_000_000;
    let mut s = Schedule::new(spec("a", every(10 * S)), t0);
    step(&mut s, t0 + 10 * S);
    s.redefine(spec("a", every(3 * S)), t0 + 12 * S)
        .expect("redefined");
    assert_eq!(s.state.next_fire_ms, Some(t0 + 15 * S));
    assert_eq!(s.state.fired, 1, "progress is kept");
    let mut other = spec("a", every(3 * S));
    other.template.queue = "elsewhere".into();
    let err = s.redefine(other, t0 + 13 * S).unwrap_err();
    assert!(err.to_string().contains("job.queue"), "{err}");
}

#[test]
fn bad_input_is_refused_naming_field_and_value() {
    let limits = Limits::default();
    let check = |sp: ScheduleSpec| sp.validate(&limits).unwrap_err();
    let e = check(spec("a", cron("61 * * * *", "UTC")));
    assert!(
        matches!(&e, BrokerError::InvalidArgument { field, problem } if field == "cron.expression" && problem.contains("61 * * * *")),
        "{e}"
    );
    let e = check(spec("a", cron("0 * * * *", "Mars/Olympus")));
    assert!(
        matches!(&e, BrokerError::InvalidArgument { field, problem } if field == "cron.time_zone" && problem.contains("Mars/Olympus")),
        "{e}"
    );
    let e = check(spec("a", cron("0 0 31 2 *", "UTC")));
    assert!(e.to_string().contains("never matches"), "{e}");
    let e = check(spec("a", every(0)));
    assert!(
        matches!(&e, BrokerError::InvalidArgument { field, .. } if field == "interval_ms"),
        "{e}"
    );
    let e = check(spec("a", every(999)));
    assert!(e.to_string().contains("999 ms"), "{e}");
    let e = check(spec(&"n".repeat(201), every(S)));
    assert!(
        e.to_string()
            .starts_with("name: 201 bytes exceeds the limit of 200"),
        "{e}"
    );
    let e = check(spec("bad name", every(S)));
    assert!(
        matches!(&e, BrokerError::InvalidArgument { field, .. } if field == "name"),
        "{e}"
    );
    let mut sp = spec("a", every(S));
    sp.template.queue = "no/slash".into();
    assert!(
        matches!(&check(sp), BrokerError::InvalidArgument { field, .. } if field == "job.queue")
    );
    let mut sp = spec("a", every(S));
    sp.template.payload = Bytes::from(vec![0; limits.max_payload_bytes + 1]);
    let e = check(sp);
    assert!(
        matches!(&e, BrokerError::InvalidArgument { field, .. } if field == "job.payload"),
        "{e}"
    );
    let mut sp = spec("a", every(S));
    sp.template
        .headers
        .insert("x-sluice-schedule".into(), "forged".into());
    assert!(check(sp).to_string().contains("reserved"));
    // Valid forms: 5 and 6 fields, any IANA zone.
    spec("a", cron("0 9 * * MON-FRI", "America/New_York"))
        .validate(&limits)
        .expect("valid");
    spec("a", cron("*/10 * * * * *", "UTC"))
        .validate(&limits)
        .expect("valid");
}

#[test]
fn the_book_finds_due_schedules_by_next_tick_only() {
    let mut book = ScheduleBook::default();
    for (name, every_s) in [("a", 10), ("b", 20), ("c", 30)] {
        book.put(Schedule::new(spec(name, every(every_s * S)), 0));
    }
    assert_eq!(book.next_due(), Some(10 * S));
    assert_eq!(book.due(9 * S), Vec::<String>::new());
    assert_eq!(book.due(20 * S), vec!["a".to_owned(), "b".to_owned()]);
    book.update("a", |s| s.set_paused(true, 20 * S));
    assert_eq!(book.due(20 * S), vec!["b".to_owned()]);
    book.update("b", |s| {
        let d = s.plan(20 * S, false);
        s.record(d, Some(Uuid::new_v4()));
    });
    assert_eq!(book.due(20 * S), Vec::<String>::new());
    assert_eq!(book.next_due(), Some(30 * S));
    assert!(book.remove("c").is_some());
    assert_eq!(book.len(), 2);
}
