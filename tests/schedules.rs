//! Recurring schedules over real gRPC, on the engine under test (`SLUICE_TEST_ENGINE=redis`
//! runs them on the Redis engine): definitions, firing with the tick header and key,
//! refusals that change nothing, overlap skip, exactly one job per tick with two Redis
//! nodes, and (WAL engine) a schedule that survives a restart with its last fire.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use sluice::broker::testing::redis::RedisServer;
use sluice::broker::{Broker, BrokerConfig, DirStorage, RedisConfig, RedisEngine, StoreConfig};
use sluice::client::{Client, ScheduleSpec};
use sluice::pb;
use tonic::Code;

use common::rpc::{assert_refused, lease};
use common::{TestBroker, eventually, serve_options};

const TICK_HEADER: &str = "x-sluice-schedule-tick";
const NAME_HEADER: &str = "x-sluice-schedule";

fn every_second(name: &str, queue: &str) -> ScheduleSpec {
    ScheduleSpec::every(Duration::from_secs(1))
        .name(name)
        .queue(queue)
        .kind("tick")
        .payload("beat")
}

/// The live jobs of `queue`; none while the queue does not exist (a schedule's queue is
/// made by its first fire).
async fn list_jobs(rpc: &mut sluice::client::Rpc, queue: &str) -> Vec<pb::Job> {
    match rpc
        .list_jobs(pb::ListJobsRequest {
            queue: queue.into(),
            ..Default::default()
        })
        .await
    {
        Ok(r) => r.into_inner().jobs,
        Err(s) if s.code() == Code::NotFound => Vec::new(),
        Err(s) => panic!("ListJobs {queue}: {s}"),
    }
}

/// Waits until `queue` holds at least `n` live jobs; returns them.
async fn jobs_at_least(rpc: &sluice::client::Rpc, queue: &str, n: usize) -> Vec<pb::Job> {
    eventually(|| {
        let mut rpc = rpc.clone();
        async move {
            let jobs = list_jobs(&mut rpc, queue).await;
            if jobs.len() >= n {
                Ok(jobs)
            } else {
                Err(format!("{} of {n} jobs in {queue}", jobs.len()))
            }
        }
    })
    .await
}

/// Waits until schedule `name` has fired at least `n` times; returns it then.
async fn fired_at_least(client: &Client, name: &str, n: u64) -> pb::ScheduleInfo {
    eventually(|| async {
        let s = schedule(client, name).await;
        if s.fired >= n {
            Ok(s)
        } else {
            Err(format!("{name} fired {} of {n} times", s.fired))
        }
    })
    .await
}

async fn schedule(client: &Client, name: &str) -> pb::ScheduleInfo {
    client
        .list_schedules()
        .await
        .unwrap()
        .into_iter()
        .find(|s| s.schedule.as_ref().is_some_and(|d| d.name == name))
        .unwrap_or_else(|| panic!("schedule {name} is not listed"))
}

/// The tick (unix ms) each job of `jobs` was enqueued for, from its idempotency key,
/// checked against its headers.
fn ticks(name: &str, jobs: &[pb::Job]) -> Vec<u64> {
    jobs.iter()
        .map(|j| {
            assert_eq!(j.headers[NAME_HEADER], name);
            let key = j.idempotency_key.strip_prefix(&format!("schedule:{name}:"));
            let tick: u64 = key.expect("a schedule key").parse().unwrap();
            let header = &j.headers[TICK_HEADER];
            let at = chrono_ms(header);
            assert_eq!(at, tick, "header {header} names the key's tick");
            tick
        })
        .collect()
}

/// Unix ms of an RFC 3339 UTC time with milliseconds (`2026-12-06T20:00:01.250Z`).
fn chrono_ms(text: &str) -> u64 {
    let (date, time) = text.trim_end_matches('Z').split_once('T').unwrap();
    let d: Vec<i64> = date.split('-').map(|p| p.parse().unwrap()).collect();
    let (hms, ms) = time.split_once('.').unwrap();
    let t: Vec<i64> = hms.split(':').map(|p| p.parse().unwrap()).collect();
    // Days from the civil date (Howard Hinnant's algorithm).
    let (y, m) = if d[1] <= 2 {
        (d[0] - 1, d[1] + 9)
    } else {
        (d[0], d[1] - 3)
    };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * m + 2) / 5 + d[2] - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    ((days * 86_400 + t[0] * 3600 + t[1] * 60 + t[2]) * 1000 + ms.parse::<i64>().unwrap()) as u64
}

#[tokio::test]
async fn schedules_are_created_listed_updated_paused_resumed_and_deleted() {
    let broker = TestBroker::start().await;
    let client = broker.client().await;
    let hourly = ScheduleSpec::cron("0 * * * *", "Europe/Paris")
        .name("hourly")
        .queue("reports")
        .kind("report")
        .priority(4)
        .header("team", "ops");
    let created = client.create_schedule(hourly.clone()).await.unwrap();
    let spec = created.schedule.clone().unwrap();
    assert_eq!((spec.name.as_str(), spec.paused), ("hourly", false));
    assert_eq!(spec.missed_ticks, pb::MissedTickPolicy::RunOnce as i32);
    let job = spec.job.unwrap();
    assert_eq!(
        (job.queue.as_str(), job.kind.as_str(), job.priority),
        ("reports", "report", 4)
    );
    // The next tick is on a whole hour (Paris is a whole number of hours from UTC).
    assert!(created.next_fire_unix_ms > created.created_unix_ms);
    assert_eq!(created.next_fire_unix_ms % 3_600_000, 0);
    assert_eq!((created.last_fire_unix_ms, created.fired), (0, 0));

    // Stats shows the schedules of the queues it shows.
    let stats_of = |queues: &[&str]| {
        let mut rpc = client.rpc();
        let queues = queues.iter().map(|q| q.to_string()).collect();
        async move {
            let stats = rpc
                .stats(pb::StatsRequest {
                    queues,
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner();
            stats
                .schedules
                .into_iter()
                .map(|s| (s.schedule.unwrap().name, s.next_fire_unix_ms))
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(
        stats_of(&[]).await,
        [("hourly".to_string(), created.next_fire_unix_ms)]
    );
    assert_eq!(
        stats_of(&["reports"]).await,
        [("hourly".to_string(), created.next_fire_unix_ms)]
    );
    assert!(stats_of(&["elsewhere"]).await.is_empty());

    assert_refused(
        client
            .rpc()
            .create_schedule(hourly.clone().into_proto())
            .await,
        Code::AlreadyExists,
        &["hourly"],
    );

    let updated = client
        .update_schedule(hourly.clone().kind("report-v2").skip_overlap())
        .await
        .unwrap();
    let spec = updated.schedule.unwrap();
    assert_eq!(spec.job.unwrap().kind, "report-v2");
    assert_eq!(spec.overlap, pb::OverlapPolicy::Skip as i32);
    assert_eq!(
        updated.next_fire_unix_ms, created.next_fire_unix_ms,
        "same trigger, same tick"
    );

    let paused = client.pause_schedule("hourly").await.unwrap();
    assert!(paused.schedule.unwrap().paused);
    assert_eq!(paused.next_fire_unix_ms, 0);
    // An update keeps the paused flag.
    let still = client.update_schedule(hourly.clone()).await.unwrap();
    assert!(still.schedule.unwrap().paused);
    let resumed = client.resume_schedule("hourly").await.unwrap();
    assert!(!resumed.schedule.unwrap().paused);
    assert_eq!(resumed.next_fire_unix_ms % 3_600_000, 0);

    // A schedule's queue cannot change.
    assert_refused(
        client
            .rpc()
            .update_schedule(hourly.clone().queue("elsewhere").into_proto())
            .await,
        Code::FailedPrecondition,
        &["job.queue", "elsewhere"],
    );

    client.delete_schedule("hourly").await.unwrap();
    assert!(client.list_schedules().await.unwrap().is_empty());
    for result in [
        client
            .rpc()
            .delete_schedule(pb::DeleteScheduleRequest {
                name: "hourly".into(),
            })
            .await
            .map(|_| ()),
        client
            .rpc()
            .pause_schedule(pb::PauseScheduleRequest {
                name: "hourly".into(),
            })
            .await
            .map(|_| ()),
        client
            .rpc()
            .update_schedule(hourly.clone().into_proto())
            .await
            .map(|_| ()),
    ] {
        assert_refused(
            result,
            Code::NotFound,
            &["schedule \"hourly\" does not exist"],
        );
    }
}

#[tokio::test]
async fn an_interval_schedule_enqueues_one_job_per_tick_with_its_header_and_key() {
    let broker = TestBroker::start().await;
    let client = broker.client().await;
    let mut rpc = client.rpc();
    let created = client
        .create_schedule(every_second("beat", "beats"))
        .await
        .unwrap();
    let jobs = jobs_at_least(&rpc, "beats", 3).await;
    let ticks = ticks("beat", &jobs);
    // One job per tick, on the interval anchored at creation.
    for (i, t) in ticks.iter().enumerate() {
        assert_eq!(
            (t - created.created_unix_ms) % 1000,
            0,
            "tick {t} is on the interval"
        );
        if i > 0 {
            assert_eq!(t - ticks[i - 1], 1000, "ticks {ticks:?}");
        }
    }
    assert!(
        jobs.iter()
            .all(|j| j.kind == "tick" && j.payload.as_ref() == b"beat")
    );
    let info = schedule(&client, "beat").await;
    assert!(info.fired >= 3);
    assert!(info.last_fire_unix_ms >= *ticks.last().unwrap());
    let listed: Vec<String> = list_jobs(&mut rpc, "beats")
        .await
        .into_iter()
        .map(|j| j.id)
        .collect();
    assert!(
        listed.contains(&info.last_job_id),
        "last job {} is one of {listed:?}",
        info.last_job_id
    );
    // Paused: nothing more fires.
    client.pause_schedule("beat").await.unwrap();
    let fired = schedule(&client, "beat").await.fired;
    let before = list_jobs(&mut rpc, "beats").await.len();
    tokio::time::sleep(Duration::from_millis(2_200)).await; // two ticks' worth
    assert_eq!(list_jobs(&mut rpc, "beats").await.len(), before);
    assert_eq!(schedule(&client, "beat").await.fired, fired);
}

#[tokio::test]
async fn bad_schedules_are_refused_naming_the_field_and_change_nothing() {
    let broker = TestBroker::start().await;
    let client = broker.client().await;
    let mut rpc = client.rpc();
    client
        .create_schedule(every_second("ok", "q").paused())
        .await
        .unwrap();
    let before = client.list_schedules().await.unwrap();
    let cases: Vec<(pb::ScheduleSpec, Vec<&str>)> = vec![
        (
            ScheduleSpec::cron("61 * * * *", "UTC")
                .name("a")
                .queue("q")
                .into_proto(),
            vec!["cron.expression", "61 * * * *"],
        ),
        (
            ScheduleSpec::cron("0 * * * *", "Mars/Olympus")
                .name("a")
                .queue("q")
                .into_proto(),
            vec!["cron.time_zone", "Mars/Olympus"],
        ),
        (
            ScheduleSpec::every(Duration::ZERO)
                .name("a")
                .queue("q")
                .into_proto(),
            vec!["interval_ms", "0 ms"],
        ),
        (
            ScheduleSpec::every(Duration::from_millis(999))
                .name("a")
                .queue("q")
                .into_proto(),
            vec!["interval_ms", "999 ms"],
        ),
        (
            every_second(&"n".repeat(201), "q").into_proto(),
            vec!["name", "201 bytes exceeds the limit of 200"],
        ),
        (
            every_second("a", "bad/queue").into_proto(),
            vec!["job.queue", "bad/queue"],
        ),
        (
            every_second("a", "q").priority(12).into_proto(),
            vec!["job.priority", "12"],
        ),
        (
            every_second("a", "q")
                .payload(vec![0u8; 1024 * 1024 + 1])
                .into_proto(),
            vec!["job.payload", "1048577 bytes"],
        ),
        (
            every_second("a", "q")
                .header("x-sluice-schedule", "forged")
                .into_proto(),
            vec!["job.headers", "reserved"],
        ),
        (
            pb::ScheduleSpec {
                name: "a".into(),
                ..Default::default()
            },
            vec!["trigger"],
        ),
    ];
    for (spec, needles) in cases {
        assert_refused(
            rpc.create_schedule(spec.clone()).await,
            Code::InvalidArgument,
            &needles,
        );
        let mut update = spec;
        update.name = "ok".into();
        if needles[0] != "name" {
            assert_refused(
                rpc.update_schedule(update).await,
                Code::InvalidArgument,
                &needles,
            );
        }
    }
    assert_eq!(client.list_schedules().await.unwrap(), before);
    assert!(list_jobs(&mut rpc, "q").await.is_empty());
}

#[tokio::test]
async fn overlap_skip_waits_for_the_previous_job_to_finish() {
    let broker = TestBroker::start().await;
    let client = broker.client().await;
    let mut rpc = client.rpc();
    client
        .create_schedule(every_second("slow", "slow-jobs").skip_overlap())
        .await
        .unwrap();
    // The first tick's job, leased and held.
    let held = eventually(|| {
        let mut rpc = rpc.clone();
        async move {
            let got = lease(&mut rpc, "slow-jobs", "w", 10).await;
            if got.is_empty() {
                Err("no job yet".to_owned())
            } else {
                Ok(got)
            }
        }
    })
    .await;
    assert_eq!(held.len(), 1);
    // Later ticks are skipped while it runs, and enqueue nothing.
    eventually(|| async {
        let s = schedule(&client, "slow").await;
        if s.skipped_overlap >= 2 {
            Ok(())
        } else {
            Err(format!("{} skipped", s.skipped_overlap))
        }
    })
    .await;
    assert!(
        list_jobs(&mut rpc, "slow-jobs").await.len() == 1,
        "only the held job is live"
    );
    assert_eq!(schedule(&client, "slow").await.fired, 1);
    // Done: the next tick fires again.
    common::rpc::ack(&mut rpc, &held).await;
    fired_at_least(&client, "slow", 2).await;
}

/// Two Redis-engine nodes on one Redis, both running the scheduler: every tick has exactly
/// one job, whichever node fired it.
#[tokio::test]
async fn two_redis_nodes_enqueue_exactly_one_job_per_tick() {
    let server = tokio::task::spawn_blocking(RedisServer::start)
        .await
        .unwrap();
    let config = || RedisConfig {
        sweep_interval: Duration::from_millis(10),
        ..RedisConfig::new(vec![server.url()])
    };
    let a = RedisEngine::connect(config()).await.unwrap();
    let b = RedisEngine::connect(config()).await.unwrap();
    let broker = TestBroker::serving_engine(a.clone(), serve_options()).await;
    let _b_served = TestBroker::serving_engine(b.clone(), serve_options()).await;
    let client = broker.client().await;
    let rpc = client.rpc();
    client
        .create_schedule(every_second("shared", "shared-jobs"))
        .await
        .unwrap();
    let jobs = jobs_at_least(&rpc, "shared-jobs", 5).await;
    let mut per_tick: BTreeMap<u64, usize> = BTreeMap::new();
    for t in ticks("shared", &jobs) {
        *per_tick.entry(t).or_default() += 1;
    }
    assert!(
        per_tick.values().all(|n| *n == 1),
        "jobs per tick: {per_tick:?}"
    );
    let ticks: Vec<u64> = per_tick.keys().copied().collect();
    assert!(
        ticks.windows(2).all(|w| w[1] - w[0] == 1000),
        "no tick skipped: {ticks:?}"
    );
    a.shutdown();
    b.shutdown();
}

/// WAL engine: a schedule and its progress survive a restart; the ticks after it continue
/// with no tick fired twice.
#[tokio::test]
async fn a_schedule_survives_a_restart_with_its_last_fire() {
    let dir = tempfile::tempdir().unwrap();
    let open = |dir: &Path| {
        Broker::open(
            BrokerConfig::default(),
            Arc::new(DirStorage::open(dir).unwrap()),
            StoreConfig::default(),
        )
        .unwrap()
        .0
    };
    let mut first = TestBroker::serving(open(dir.path())).await;
    let client = first.client().await;
    client
        .create_schedule(every_second("kept", "kept-jobs"))
        .await
        .unwrap();
    let before = fired_at_least(&client, "kept", 2).await;
    first.stop();
    first.broker().shutdown();
    first.broker().close_storage();
    let _ = (&mut first.handle).await;
    drop(first);

    let second = TestBroker::serving(open(dir.path())).await;
    let client = second.client().await;
    let after = schedule(&client, "kept").await;
    assert!(after.last_fire_unix_ms >= before.last_fire_unix_ms);
    assert!(after.fired >= before.fired);
    assert_eq!(after.created_unix_ms, before.created_unix_ms);
    let rpc = client.rpc();
    let fired = after.fired;
    let jobs = jobs_at_least(&rpc, "kept-jobs", (fired + 2) as usize).await;
    let ticks = ticks("kept", &jobs);
    let mut sorted = ticks.clone();
    sorted.sort_unstable();
    sorted.dedup();
    assert_eq!(sorted.len(), ticks.len(), "no tick has two jobs: {ticks:?}");
    assert!(
        sorted
            .iter()
            .all(|t| (t - after.created_unix_ms) % 1000 == 0),
        "every tick is on the interval anchored at creation: {sorted:?}"
    );
}

/// A full queue refuses a tick's job: the schedule records nothing for it (no fire, no
/// skip) and tries again, and fires once there is room.
#[tokio::test]
async fn a_full_queue_holds_the_schedule_back_until_there_is_room() {
    let broker = TestBroker::start().await;
    let client = broker.client().await;
    let mut rpc = client.rpc();
    client
        .create_queue(
            "tiny",
            pb::QueuePolicy {
                max_depth: 1,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    client
        .create_schedule(every_second("into-tiny", "tiny"))
        .await
        .unwrap();
    let [first] = &jobs_at_least(&rpc, "tiny", 1).await[..] else {
        panic!("one job expected");
    };
    // The next tick finds the queue full: it stays due (the schedule keeps trying), with
    // still one job and one fire.
    eventually(|| async {
        let s = schedule(&client, "into-tiny").await;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64;
        if now > s.next_fire_unix_ms + 1_500 {
            Ok(())
        } else {
            Err(format!(
                "the tick at {} is not overdue yet",
                s.next_fire_unix_ms
            ))
        }
    })
    .await;
    let info = schedule(&client, "into-tiny").await;
    assert_eq!(info.fired, 1);
    assert_eq!(info.last_job_id, first.id);
    assert_eq!(list_jobs(&mut rpc, "tiny").await.len(), 1);
    // Room again: the schedule fires.
    let leased = lease(&mut rpc, "tiny", "w", 1).await;
    common::rpc::ack(&mut rpc, &leased).await;
    fired_at_least(&client, "into-tiny", 2).await;
}

/// A schema on the schedule's queue applies to its jobs as to any Enqueue: a template that
/// fails it is refused at CreateSchedule/UpdateSchedule (nothing is made), one that passes
/// fires, and one that fails a schema set later is held back, not enqueued.
#[tokio::test]
async fn a_queue_schema_applies_to_the_schedule_and_its_ticks() {
    let broker = TestBroker::start().await;
    let client = broker.client().await;
    let mut rpc = client.rpc();
    let set_schema = |text: &'static str| pb::SetSchemaRequest {
        target: Some(pb::SchemaTarget {
            target: Some(pb::schema_target::Target::Queue("typed".into())),
        }),
        schema: Some(pb::set_schema_request::Schema::JsonSchema(pb::JsonSchema {
            text: text.into(),
        })),
    };
    rpc.set_schema(set_schema(r#"{"type": "object", "required": ["n"]}"#))
        .await
        .unwrap();
    let bad = every_second("typed-beat", "typed").payload(r#"{"m": 1}"#);
    assert_refused(
        client.rpc().create_schedule(bad.clone().into_proto()).await,
        Code::InvalidArgument,
        &["job[0].payload", "required"],
    );
    assert!(client.list_schedules().await.unwrap().is_empty());

    let good = every_second("typed-beat", "typed").payload(r#"{"n": 1}"#);
    client.create_schedule(good.clone()).await.unwrap();
    assert_refused(
        client.rpc().update_schedule(bad.into_proto()).await,
        Code::InvalidArgument,
        &["job[0].payload", "required"],
    );
    let jobs = jobs_at_least(&rpc, "typed", 1).await;
    assert_eq!(jobs[0].payload, br#"{"n": 1}"#.to_vec());

    // A stricter schema later: the ticks' jobs fail it and are not enqueued.
    rpc.set_schema(set_schema(
        r#"{"type": "object", "required": ["n", "extra"]}"#,
    ))
    .await
    .unwrap();
    let held_at = schedule(&client, "typed-beat").await.fired;
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    let after = schedule(&client, "typed-beat").await.fired;
    assert!(
        after <= held_at + 1,
        "at most a fire already planned lands after the new schema: {held_at} -> {after}"
    );
    for job in list_jobs(&mut rpc, "typed").await {
        assert_eq!(job.payload, br#"{"n": 1}"#.to_vec());
    }
}
