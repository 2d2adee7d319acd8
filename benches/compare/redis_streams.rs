//! Redis Streams runners (redis crate, 127.0.0.1:6379). This Redis runs without
//! persistence (no AOF / RDB here), so it appears in the memory table only.
//!
//! Topic: XADD (MAXLEN ~ 100,000, like Sluice's default retention) in pipelines of `batch`,
//! subscribers XREAD BLOCK from the last id (no acks, like Sluice subscriptions).
//! Work queue: a consumer group; workers XREADGROUP COUNT `batch`, then XACK + XDEL the
//! whole batch in one pipeline (the job is gone once acked, as in Sluice).
//!
//! Its load loops (publishers, fillers, workers, subscribers) look like the other peers'
//! on purpose and are not shared: each peer is measured through its own client code, and
//! a shared loop could bias one; what is shared (`common.rs`) is pacing, metering, the
//! drain wait and the wording of outcomes.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use redis::aio::MultiplexedConnection;
use redis::streams::StreamReadReply;

use crate::common::*;

/// Address probed for availability.
pub const ADDR: &str = "127.0.0.1:6379";

async fn connect() -> Res<MultiplexedConnection> {
    let client = redis::Client::open("redis://127.0.0.1:6379/")?;
    let mut c = client.get_multiplexed_async_connection().await?;
    c.set_response_timeout(Duration::from_secs(30));
    Ok(c)
}

/// `redis_version`, persistence settings and `maxmemory` from INFO.
pub async fn version() -> String {
    let Ok(mut c) = connect().await else {
        return "redis unavailable".into();
    };
    let info: String = redis::cmd("INFO")
        .arg("server")
        .query_async(&mut c)
        .await
        .unwrap_or_default();
    let persistence: String = redis::cmd("INFO")
        .arg("persistence")
        .query_async(&mut c)
        .await
        .unwrap_or_default();
    let field = |text: &str, k: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{k}:")))
            .unwrap_or("?")
            .trim()
            .to_string()
    };
    let save: Vec<String> = redis::cmd("CONFIG")
        .arg("GET")
        .arg("save")
        .query_async(&mut c)
        .await
        .unwrap_or_default();
    format!(
        "Redis {} (aof_enabled={}, save=\"{}\")",
        field(&info, "redis_version"),
        field(&persistence, "aof_enabled"),
        save.get(1).cloned().unwrap_or_default()
    )
}

/// The server's pid.
pub fn pid() -> Option<u32> {
    pid_by_name("redis-server")
}

async fn del(key: &str) {
    if let Ok(mut c) = connect().await {
        let _: Result<i64, _> = redis::cmd("DEL").arg(key).query_async(&mut c).await;
    }
}

async fn xadd_batch(c: &mut MultiplexedConnection, key: &str, body: &[u8], n: usize) -> Res<()> {
    let mut p = redis::pipe();
    for _ in 0..n {
        p.cmd("XADD")
            .arg(key)
            .arg("MAXLEN")
            .arg("~")
            .arg(100_000)
            .arg("*")
            .arg("p")
            .arg(body)
            .ignore();
    }
    p.query_async::<()>(c).await?;
    Ok(())
}

async fn xadd_unbounded(
    c: &mut MultiplexedConnection,
    key: &str,
    body: &[u8],
    n: usize,
) -> Res<()> {
    let mut p = redis::pipe();
    for _ in 0..n {
        p.cmd("XADD").arg(key).arg("*").arg("p").arg(body).ignore();
    }
    p.query_async::<()>(c).await?;
    Ok(())
}

fn payload_of(id: &redis::streams::StreamId) -> Option<&[u8]> {
    match id.map.get("p") {
        Some(redis::Value::BulkString(b)) => Some(b.as_slice()),
        _ => None,
    }
}

/// XREAD loop of one subscriber; calls `on` for each entry's payload.
async fn reader(key: String, meter: Meter, mut on: impl FnMut(&[u8]) + Send) -> Res<()> {
    let mut c = connect().await?;
    let mut last = "$".to_string();
    while !meter.stopped() {
        let r: Option<StreamReadReply> = redis::cmd("XREAD")
            .arg("COUNT")
            .arg(1000)
            .arg("BLOCK")
            .arg(100)
            .arg("STREAMS")
            .arg(&key)
            .arg(&last)
            .query_async(&mut c)
            .await?;
        if let Some(r) = r {
            for k in r.keys {
                meter.add(k.ids.len() as u64);
                for id in &k.ids {
                    if let Some(p) = payload_of(id) {
                        on(p);
                    }
                }
                if let Some(l) = k.ids.last() {
                    last = l.id.clone();
                }
            }
        }
    }
    Ok(())
}

/// S1: XADD pipelines of `batch`; `subs` XREAD subscribers.
pub async fn s1(s: &Settings, subs: usize, batch: usize) -> Res<Outcome> {
    let key = format!("bench:s1:{}", run_id());
    let r = async {
        let meter = Meter::new();
        let mut tasks = Vec::new();
        for _ in 0..subs {
            let (key, meter) = (key.clone(), meter.clone());
            tasks.push(tokio::spawn(async move {
                if reader(key, meter.clone(), |_| {}).await.is_err() {
                    meter.error();
                }
            }));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        let publisher = connect().await?;
        for _ in 0..s.in_flight {
            let (mut c, key, meter) = (publisher.clone(), key.clone(), meter.clone());
            tasks.push(tokio::spawn(async move {
                let body = payload(128, 0, 0);
                while !meter.stopped() {
                    if xadd_batch(&mut c, &key, &body, batch).await.is_err() {
                        meter.error();
                    }
                }
            }));
        }
        let (n, el) = meter.measure(s).await;
        for t in tasks {
            let _ = t.await;
        }
        Ok::<_, BoxError>(meter.outcome(n, el, "msg/s delivered"))
    }
    .await;
    del(&key).await;
    r
}

async fn create_group(key: &str) -> Res<()> {
    let mut c = connect().await?;
    redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(key)
        .arg("g")
        .arg("$")
        .arg("MKSTREAM")
        .query_async::<()>(&mut c)
        .await?;
    Ok(())
}

/// One worker: XREADGROUP up to `batch`, then XACK + XDEL them; counts acked entries.
async fn worker(
    key: String,
    name: String,
    batch: usize,
    meter: Meter,
    mut hist: Option<hdrhistogram::Histogram<u64>>,
) -> Res<Option<hdrhistogram::Histogram<u64>>> {
    let mut c = connect().await?;
    while !meter.stopped() {
        let r: Option<StreamReadReply> = redis::cmd("XREADGROUP")
            .arg("GROUP")
            .arg("g")
            .arg(&name)
            .arg("COUNT")
            .arg(batch)
            .arg("BLOCK")
            .arg(100)
            .arg("STREAMS")
            .arg(&key)
            .arg(">")
            .query_async(&mut c)
            .await?;
        let Some(r) = r else { continue };
        let ids: Vec<String> = r
            .keys
            .iter()
            .flat_map(|k| k.ids.iter())
            .map(|id| {
                if let Some(h) = hist.as_mut()
                    && let Some(st) = payload_of(id).and_then(stamp_of)
                {
                    record_since(h, st);
                }
                id.id.clone()
            })
            .collect();
        if ids.is_empty() {
            continue;
        }
        let mut p = redis::pipe();
        p.cmd("XACK").arg(&key).arg("g").arg(&ids).ignore();
        p.cmd("XDEL").arg(&key).arg(&ids).ignore();
        p.query_async::<()>(&mut c).await?;
        meter.add(ids.len() as u64);
    }
    Ok(hist)
}

/// S2: 2 producers (XADD pipelines), 4 XREADGROUP workers acking every batch.
pub async fn s2(s: &Settings, batch: usize) -> Res<Outcome> {
    let key = format!("bench:s2:{}", run_id());
    let r = async {
        create_group(&key).await?;
        let meter = Meter::new();
        let mut tasks = Vec::new();
        for w in 0..4 {
            let (key, meter) = (key.clone(), meter.clone());
            tasks.push(tokio::spawn(async move {
                if worker(key, format!("w{w}"), batch, meter.clone(), None)
                    .await
                    .is_err()
                {
                    meter.error();
                }
            }));
        }
        for _ in 0..2 {
            let c = connect().await?;
            for _ in 0..s.in_flight {
                let (mut c, key, meter) = (c.clone(), key.clone(), meter.clone());
                tasks.push(tokio::spawn(async move {
                    let body = payload(256, 0, 0);
                    while !meter.stopped() {
                        if xadd_unbounded(&mut c, &key, &body, batch).await.is_err() {
                            meter.error();
                        }
                    }
                }));
            }
        }
        let (n, el) = meter.measure(s).await;
        for t in tasks {
            let _ = t.await;
        }
        Ok::<_, BoxError>(meter.outcome(n, el, "jobs/s acked"))
    }
    .await;
    del(&key).await;
    r
}

async fn xadd_open_loop(key: &str, rate_per_s: u64, s: &Settings) -> Res<OpenLoopStats> {
    let c = connect().await?;
    let key = key.to_string();
    Ok(
        open_loop(rate_per_s, s.warmup, s.window, move |seq, intended| {
            let (mut c, key) = (c.clone(), key.clone());
            async move {
                redis::cmd("XADD")
                    .arg(&key)
                    .arg("MAXLEN")
                    .arg("~")
                    .arg(100_000)
                    .arg("*")
                    .arg("p")
                    .arg(payload(128, seq, intended))
                    .query_async::<()>(&mut c)
                    .await?;
                Ok(())
            }
        })
        .await,
    )
}

async fn fanout(
    s: &Settings,
    rate_per_s: u64,
    subs: usize,
) -> Res<(hdrhistogram::Histogram<u64>, OpenLoopStats, Option<i64>)> {
    let key = format!("bench:lat:{}", run_id());
    let r = async {
        let rss0 = pid().and_then(rss_bytes);
        let meter = Meter::new();
        let mut readers = Vec::new();
        for _ in 0..subs {
            let (key, meter) = (key.clone(), meter.clone());
            readers.push(tokio::spawn(async move {
                let mut h = histogram();
                let _ = reader(key, meter, |p| {
                    if let Some(st) = stamp_of(p) {
                        record_since(&mut h, st);
                    }
                })
                .await;
                h
            }));
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        let mem = rss_delta(rss0, pid().and_then(rss_bytes));
        let st = xadd_open_loop(&key, rate_per_s, s).await?;
        tokio::time::sleep(Duration::from_millis(300)).await;
        meter.stop.store(true, Ordering::Relaxed);
        let mut h = histogram();
        for r in readers {
            h.add(r.await?)?;
        }
        Ok::<_, BoxError>((h, st, mem))
    }
    .await;
    del(&key).await;
    r
}

/// S3 publish->deliver (XADD -> XREAD BLOCK).
pub async fn s3_topic(s: &Settings, rate_per_s: u64) -> Res<Outcome> {
    let (h, st, _) = fanout(s, rate_per_s, 1).await?;
    Ok(Outcome::Measured {
        main: crate::sluice_peer::percentiles_short(&h),
        extra: format!(
            "sent {} in {:.1} s, failed {}; {}",
            thousands(st.sent),
            st.elapsed.as_secs_f64(),
            st.failed,
            percentiles(&h)
        ),
    })
}

/// S4 fan-out (one connection per XREAD subscriber).
pub async fn s4(s: &Settings, rate_per_s: u64, subs: usize) -> Res<Outcome> {
    let (h, st, mem) = fanout(s, rate_per_s, subs).await?;
    Ok(fanout_outcome(
        &h,
        st,
        mem,
        rate_per_s,
        subs,
        "redis-server",
    ))
}

/// S3 enqueue->lease (XADD -> XREADGROUP BLOCK, 2 workers, XACK + XDEL).
pub async fn s3_queue(s: &Settings, rate_per_s: u64) -> Res<Outcome> {
    let key = format!("bench:s3q:{}", run_id());
    let r = async {
        create_group(&key).await?;
        let meter = Meter::new();
        let mut workers = Vec::new();
        for w in 0..2 {
            workers.push(tokio::spawn(worker(
                key.clone(),
                format!("w{w}"),
                100,
                meter.clone(),
                Some(histogram()),
            )));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        let st = xadd_open_loop(&key, rate_per_s, s).await?;
        tokio::time::sleep(Duration::from_millis(300)).await;
        meter.stop.store(true, Ordering::Relaxed);
        let mut h = histogram();
        for w in workers {
            if let Some(x) = w.await?? {
                h.add(x)?;
            }
        }
        Ok::<_, BoxError>(Outcome::Measured {
            main: crate::sluice_peer::percentiles_short(&h),
            extra: format!(
                "sent {} in {:.1} s, failed {}; {}",
                thousands(st.sent),
                st.elapsed.as_secs_f64(),
                st.failed,
                percentiles(&h)
            ),
        })
    }
    .await;
    del(&key).await;
    r
}

/// S5 backlog: `n` x 128 B XADDed in pipelines of 1,000, redis-server RSS growth, drained
/// by 4 group workers (COUNT 1,000, XACK + XDEL).
pub async fn s5_backlog(s: &Settings, n: u64) -> Res<Outcome> {
    let key = format!("bench:s5:{}", run_id());
    let r = async {
        create_group(&key).await?;
        let rss0 = pid().and_then(rss_bytes);
        let c = connect().await?;
        let next = Arc::new(AtomicU64::new(0));
        let t0 = Instant::now();
        let mut tasks = Vec::new();
        for _ in 0..s.in_flight {
            let (mut c, key, next) = (c.clone(), key.clone(), next.clone());
            tasks.push(tokio::spawn(async move {
                let body = payload(128, 0, 0);
                loop {
                    let start = next.fetch_add(1000, Ordering::Relaxed);
                    if start >= n {
                        return Ok::<(), BoxError>(());
                    }
                    let k = (n - start).min(1000) as usize;
                    xadd_unbounded(&mut c, &key, &body, k).await?;
                }
            }));
        }
        for t in tasks {
            t.await??;
        }
        let fill_time = t0.elapsed();
        tokio::time::sleep(Duration::from_millis(300)).await;
        let rss1 = pid().and_then(rss_bytes);
        let meter = Meter::new();
        let t1 = Instant::now();
        let mut workers = Vec::new();
        for w in 0..4 {
            workers.push(tokio::spawn(worker(
                key.clone(),
                format!("w{w}"),
                1000,
                meter.clone(),
                None,
            )));
        }
        let drain_time = drained(&meter, n, t1, workers).await?;
        let rss_growth = rss_delta(rss0, rss1);
        let outcome = backlog_outcome(
            n,
            fill_time,
            drain_time,
            rss_growth,
            "redis-server",
            "entry",
        );
        Ok::<_, BoxError>(outcome)
    }
    .await;
    del(&key).await;
    r
}

/// Deletes every key matching `bench:*` (left behind when a figure was cut off by its
/// time limit).
pub async fn sweep() -> usize {
    let Ok(mut c) = connect().await else { return 0 };
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("bench:*")
        .query_async(&mut c)
        .await
        .unwrap_or_default();
    if keys.is_empty() {
        return 0;
    }
    let _: Result<i64, _> = redis::cmd("DEL").arg(&keys).query_async(&mut c).await;
    keys.len()
}
