//! Crash tests of recurring schedules with the real `sluice` binary: the exactly-once
//! ledger of schedule runs.
//!
//! * WAL engine: a 1 s interval schedule while the broker is SIGKILLed at random offsets
//!   around its fire times and restarted on the same data directory (after random down
//!   times). Then: no tick has two jobs; every tick that came due while the broker was up
//!   has its job; the latest tick due at each restart has its job (missed ticks run once).
//! * Redis engine: two nodes on one Redis, one SIGKILLed around fire times and restarted
//!   again and again while the other runs: every tick of the run has exactly one job.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::{SERVE_LOG, connect_child as connect};
use sluice::broker::testing::redis::RedisServer;
use sluice::pb;
use sluice::pb::broker_client::BrokerClient;
use tonic::transport::Channel;

const QUEUE: &str = "ticks";
const SCHEDULE: &str = "every-second";
const PERIOD_MS: u64 = 1_000;
/// A fire is appended and fsynced within a ticker round (10 ms) of its tick, give or take
/// a loaded machine's scheduling delays; a tick this close before a kill may be lost with
/// it, and is then run at the restart (checked below: the latest tick due at each restart
/// has its job) or, when a newer tick is due by then, counted as missed.
const FIRE_LATENCY_MS: u64 = 400;

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

fn spawn(args: &[&str]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["serve", "--listen", "127.0.0.1:0"])
        .args(args)
        .env("SLUICE_LOG", SERVE_LOG)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("starting the sluice binary")
}

fn spawn_wal(dir: &Path) -> Child {
    spawn(&[
        "--data-dir",
        dir.to_str().unwrap(),
        "--storage",
        "wal",
        "--fsync",
        "always",
    ])
}

async fn create_schedule(client: &mut BrokerClient<Channel>) -> pb::ScheduleInfo {
    client
        .create_schedule(pb::ScheduleSpec {
            name: SCHEDULE.into(),
            trigger: Some(pb::schedule_spec::Trigger::IntervalMs(PERIOD_MS)),
            job: Some(pb::ScheduleJob {
                queue: QUEUE.into(),
                kind: "tick".into(),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
}

/// Jobs per tick (from each job's idempotency key, checked against its tick header's
/// presence), over every live job of the queue.
async fn ledger(client: &mut BrokerClient<Channel>) -> BTreeMap<u64, usize> {
    let mut per_tick = BTreeMap::new();
    let mut token = String::new();
    loop {
        let page = client
            .list_jobs(pb::ListJobsRequest {
                queue: QUEUE.into(),
                page_size: 1000,
                page_token: token.clone(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        for job in page.jobs {
            assert!(job.headers.contains_key("x-sluice-schedule-tick"));
            let tick: u64 = job
                .idempotency_key
                .strip_prefix(&format!("schedule:{SCHEDULE}:"))
                .expect("a schedule's idempotency key")
                .parse()
                .unwrap();
            *per_tick.entry(tick).or_default() += 1;
        }
        if page.next_page_token.is_empty() {
            return per_tick;
        }
        token = page.next_page_token;
    }
}

/// A pseudo-random number in `0..n` (the test needs spread, not quality).
fn random(n: u64) -> u64 {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .subsec_nanos() as u64;
    (nanos.wrapping_mul(6_364_136_223_846_793_005) >> 17) % n.max(1)
}

/// Sleeps until `at` (unix ms).
async fn sleep_until(at: u64) {
    tokio::time::sleep(Duration::from_millis(at.saturating_sub(now_ms()))).await;
}

/// The first tick (anchored at `anchor`) after `t`.
fn tick_after(anchor: u64, t: u64) -> u64 {
    anchor + ((t.saturating_sub(anchor)) / PERIOD_MS + 1) * PERIOD_MS
}

fn assert_one_job_each(per_tick: &BTreeMap<u64, usize>, anchor: u64) {
    for (tick, n) in per_tick {
        assert_eq!(*n, 1, "tick {tick} has {n} jobs: {per_tick:?}");
        assert_eq!(
            (tick - anchor) % PERIOD_MS,
            0,
            "tick {tick} is off the interval"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wal_broker_killed_around_fire_times_runs_each_tick_once() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = spawn_wal(dir.path());
    let mut client = connect(&mut child).await;
    let anchor = create_schedule(&mut client).await.created_unix_ms;
    // (up from, killed at) of each run; the restart times.
    let mut up: Vec<(u64, u64)> = Vec::new();
    // (spawned at, answering from) for each restart.
    let mut restarts: Vec<(u64, u64)> = Vec::new();
    let mut up_from = anchor;
    for cycle in 0..6 {
        // Kill within ±60 ms of a tick every other cycle, anywhere in the period otherwise.
        let tick = tick_after(anchor, now_ms() + 1_200 + random(1_500));
        let kill_at = if cycle % 2 == 0 {
            tick - 60 + random(120)
        } else {
            tick + random(PERIOD_MS)
        };
        sleep_until(kill_at).await;
        child.kill().unwrap();
        let killed = now_ms();
        child.wait().unwrap();
        up.push((up_from, killed));
        // Down for 0 to 2.5 s: some restarts within a tick, some past several.
        tokio::time::sleep(Duration::from_millis(random(2_500))).await;
        let spawned = now_ms();
        child = spawn_wal(dir.path());
        client = connect(&mut child).await;
        up_from = now_ms();
        restarts.push((spawned, up_from));
    }
    // Two more ticks on the last run, then the ledger.
    sleep_until(tick_after(anchor, now_ms() + PERIOD_MS) + 300).await;
    let end = now_ms();
    up.push((up_from, end));
    let per_tick = ledger(&mut client).await;
    child.kill().unwrap();
    let _ = child.wait();

    assert_one_job_each(&per_tick, anchor);
    assert!(
        per_tick.len() >= 8,
        "ticks fired across the kills: {per_tick:?}"
    );
    for (from, to) in &up {
        let mut t = tick_after(anchor, *from);
        while t + FIRE_LATENCY_MS <= *to {
            assert!(
                per_tick.contains_key(&t),
                "tick {t} came due while the broker was up ({from}..{to}) but has no job: {per_tick:?}"
            );
            t += PERIOD_MS;
        }
    }
    for (spawned, answering) in restarts {
        // The scheduler catches up the latest tick due when it starts, somewhere between
        // the spawn and its first answer (a start that crosses a tick under load catches
        // up that later tick instead).
        let latest = tick_after(anchor, spawned) - PERIOD_MS;
        if latest > anchor {
            let caught_up = (0..)
                .map(|k| latest + k * PERIOD_MS)
                .take_while(|t| *t <= answering)
                .any(|t| per_tick.contains_key(&t));
            assert!(
                caught_up,
                "no tick from {latest} (the latest due at the restart at {spawned}) to the \
                 first answer at {answering} has a job: {per_tick:?}"
            );
        }
    }
}

fn spawn_redis_node(url: &str) -> Child {
    spawn(&["--storage", "redis", "--redis", url])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_node_killed_around_fire_times_while_another_runs_misses_and_doubles_nothing() {
    let server = tokio::task::spawn_blocking(RedisServer::start)
        .await
        .unwrap();
    let mut steady = spawn_redis_node(&server.url());
    let mut client = connect(&mut steady).await;
    let mut flaky = spawn_redis_node(&server.url());
    let _ = connect(&mut flaky).await;
    let anchor = create_schedule(&mut client).await.created_unix_ms;
    for _ in 0..6 {
        let tick = tick_after(anchor, now_ms() + 300 + random(1_000));
        sleep_until(tick - 50 + random(100)).await;
        flaky.kill().unwrap();
        flaky.wait().unwrap();
        tokio::time::sleep(Duration::from_millis(random(800))).await;
        flaky = spawn_redis_node(&server.url());
        let _ = connect(&mut flaky).await;
    }
    let end = tick_after(anchor, now_ms() + PERIOD_MS);
    sleep_until(end + 300).await;
    let per_tick = ledger(&mut client).await;
    flaky.kill().unwrap();
    steady.kill().unwrap();
    let _ = (flaky.wait(), steady.wait());

    assert_one_job_each(&per_tick, anchor);
    assert!(
        per_tick.len() >= 6,
        "ticks fired across the kills: {per_tick:?}"
    );
    let mut t = anchor + PERIOD_MS;
    while t <= end {
        assert!(
            per_tick.contains_key(&t),
            "tick {t} has no job: {per_tick:?}"
        );
        t += PERIOD_MS;
    }
}
